"""filter --embeddings: CLIP scores read from a dallekit embed folder, and the embeddings that are refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import EmbedConfig, FilterConfig
from dallekit.errors import BadInputError
from dallekit.pipeline import filter as filter_module
from dallekit.pipeline.embed import embed
from tests.helpers import check_accounting, run_cli
from tests.stage_data import downloaded_row, shape_jpeg, write_stage

TINY = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None, device="cpu")
# every row reaches the CLIP rule: no size, caption or language rule rejects these rows
OPEN = dict(min_side=0, min_caption_words=0, min_caption_chars=0, languages=["any"], clip_threshold=-1.0)


def shards() -> list[list[dict]]:
    rows = [downloaded_row(f"r{i:02d}", f"a red shape number {i}", shape_jpeg(i, size=96)) for i in range(7)]
    rows.append(downloaded_row("cut", "a truncated jpeg", shape_jpeg(99, size=96)[:200]))
    return [rows[:4], rows[4:]]


def embedded_clean(tmp_path, client, config=TINY):
    """A cleaned folder and a finished embed of it, by the given CLIP."""
    write_stage(tmp_path / "clean", shards(), stage="clean")
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**config), client)
    return tmp_path / "clean", tmp_path / "embed"


def filtered(tmp_path, client, clean, name, **options) -> tuple[dict, dict]:
    """(uid -> clip_score of every row, uid -> reason of the rejects) of one filter run."""
    out = tmp_path / name
    filter_module.filter(str(clean), str(out), FilterConfig(**TINY, **OPEN, **options), client)
    kept, rejects = check_accounting(out, 8)
    scores = dict(zip(kept["uid"], kept["clip_score"])) | dict(zip(rejects["uid"], rejects["clip_score"]))
    return scores, dict(zip(rejects["uid"], rejects["reason"]))


@pytest.mark.slow
def test_scores_from_embeddings_match_scores_from_clip(tmp_path, client):
    clean, embeddings = embedded_clean(tmp_path, client)
    direct, direct_reasons = filtered(tmp_path, client, clean, "direct")
    stored, stored_reasons = filtered(tmp_path, client, clean, "stored", embeddings=str(embeddings))
    assert stored_reasons == direct_reasons == {"cut": "undecodable"}  # embed's undecodable row is filter's too
    assert set(stored) == set(direct)
    for uid, score in direct.items():
        if uid != "cut":
            assert abs(stored[uid] - score) < 3e-3, uid  # float16 vectors: within rounding of a fresh score


def test_embeddings_of_another_input_or_model_are_refused(tmp_path, client, capsys):
    clean, embeddings = embedded_clean(tmp_path, client)
    other = tmp_path / "other"
    write_stage(other, shards()[:1], stage="clean")
    with pytest.raises(BadInputError, match=r"embeddings of .*clean as it was then, not of .*other"):
        filter_module.plan_filter(str(other), FilterConfig(**TINY, embeddings=str(embeddings)))
    code, err = run_cli(capsys, "filter", clean, "--out", tmp_path / "f", "--clip-model", "dallekit-tiny-rn-clip",
                        "--embeddings", embeddings)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dallekit-tiny-clip (random weights)" in err and "dallekit-tiny-rn-clip/laion2b_s34b_b79k" in err  # the default tag
    with pytest.raises(BadInputError, match="expected the output of `dallekit embed`"):
        filter_module.plan_filter(str(clean), FilterConfig(**TINY, embeddings=str(clean)))


def test_embeddings_whose_uids_are_not_the_shards_rows_are_refused(tmp_path, client):
    clean, embeddings = embedded_clean(tmp_path, client)
    shard = embeddings / "part-00001.parquet"
    table = pq.read_table(shard)
    uids = table.column("uid").to_pylist()
    renamed = table.set_column(0, "uid", pa.array(["stranger"] + uids[1:]))
    pq.write_table(renamed.replace_schema_metadata(table.schema.metadata), shard)
    with pytest.raises(BadInputError, match=r"part-00001.parquet: its uids are not the rows of .*part-00001.parquet \(uid \S+ is in one"):
        filter_module.filter(str(clean), str(tmp_path / "f"), FilterConfig(**TINY, **OPEN, embeddings=str(embeddings)), client)


def test_embeddings_with_no_clip_are_refused(tmp_path):
    write_stage(tmp_path / "clean", shards(), stage="clean")
    with pytest.raises(BadInputError, match="--no-clip"):
        filter_module.plan_filter(str(tmp_path / "clean"), FilterConfig(clip=False, embeddings=str(tmp_path / "e")))


def test_scores_are_image_dot_text_of_the_stored_vectors(tmp_path, client):
    from dallekit.pipeline.embeddings import embedding_matrix

    clean, embeddings = embedded_clean(tmp_path, client)
    scores, _ = filtered(tmp_path, client, clean, "stored", embeddings=str(embeddings))
    table = pq.read_table(embeddings / "part-00000.parquet")
    image = embedding_matrix(table.column("image_embedding")).astype(np.float32)
    text = embedding_matrix(table.column("text_embedding")).astype(np.float32)
    for uid, i, t in zip(table.column("uid").to_pylist(), image, text):
        assert scores[uid] == pytest.approx(float(i @ t), abs=1e-5)
