"""embed: unit-norm float16 CLIP vectors with the model in the metadata, rejects and their reasons, resume, the fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import EmbedConfig
from dallekit.errors import BadInputError
from dallekit.images import decode_rgb
from dallekit.models.clip import cached_clip, save_clip
from dallekit.pipeline.embed import embed, plan_embed
from dallekit.pipeline.embeddings import FORMAT, embedding_matrix, model_identity, shard_metadata
from dallekit.pipeline.filter import scorer_input_size
from tests.helpers import check_accounting, run_cli
from tests.stage_data import downloaded_row, png_header_only, shape_jpeg, write_stage

TINY = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None, device="cpu")


def good_rows(prefix: str, n: int) -> list[dict]:
    return [downloaded_row(f"{prefix}{i:03d}", f"a shape number {i}", shape_jpeg(hash(prefix) % 1000 + i, size=96)) for i in range(n)]


def bad_rows() -> list[dict]:
    """One row per reject reason: no bytes (a failed download), over 64 Mpx by the header, a cut-off JPEG, not an image."""
    return [
        downloaded_row("failed", "a failed download", None, status="failed_to_download"),
        downloaded_row("empty", "no bytes at all", b""),
        downloaded_row("huge", "a huge png", png_header_only(9000, 9000)),
        downloaded_row("cut", "a truncated jpeg", shape_jpeg(7, size=96)[:200]),
        downloaded_row("text", "not an image", b"hello, world"),
    ]


def test_vectors_are_unit_float16_with_the_model_in_every_shard_and_rejects_add_up(tmp_path, client):
    shards = [good_rows("a", 5) + bad_rows()[:3], good_rows("b", 4) + bad_rows()[3:]]
    write_stage(tmp_path / "clean", shards)
    config = EmbedConfig(**TINY, batch_size=3)
    stats = embed(str(tmp_path / "clean"), str(tmp_path / "embed"), config, client)
    kept, rejects = check_accounting(tmp_path / "embed", 14)
    assert stats["rows_out"] == 9 and sorted(kept["uid"]) == sorted(r["uid"] for s in shards for r in s if r["uid"][0] in "ab")
    assert rejects.set_index("uid")["reason"].to_dict() == {
        "failed": "no_image", "empty": "no_image", "huge": "image_too_large", "cut": "undecodable", "text": "undecodable"}
    assert stats["reasons"] == {"no_image": 2, "image_too_large": 1, "undecodable": 2}
    for path in sorted((tmp_path / "embed").glob("part-*.parquet")):
        table = pq.read_table(path)
        assert table.column_names == ["uid", "image_embedding", "text_embedding"]
        assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 64)
        meta = shard_metadata(str(path))
        assert meta == {"format": FORMAT, "model": model_identity("dallekit-tiny-clip", None, None), "dim": 64}
        for column in ("image_embedding", "text_embedding"):
            vectors = embedding_matrix(table.column(column))
            assert vectors.dtype == np.float16 and vectors.shape == (table.num_rows, 64)
            assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)


def test_image_embedding_equals_the_scorers_of_the_decoded_image(tmp_path, client):
    rows = good_rows("e", 4)
    write_stage(tmp_path / "clean", [rows])
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)
    table = pq.read_table(tmp_path / "embed" / "part-00000.parquet")
    scorer = cached_clip("dallekit-tiny-clip", None, None, "cpu")
    by_uid = {r["uid"]: r for r in rows}
    images = [decode_rgb(by_uid[u]["jpg"], draft_size=scorer_input_size(scorer)) for u in table.column("uid").to_pylist()]
    expected = scorer.embed_images(images).numpy()
    texts = scorer.embed_texts([by_uid[u]["caption"] for u in table.column("uid").to_pylist()]).numpy()
    assert np.abs(embedding_matrix(table.column("image_embedding")).astype(np.float32) - expected).max() < 2e-3
    assert np.abs(embedding_matrix(table.column("text_embedding")).astype(np.float32) - texts).max() < 2e-3
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # different images give different vectors: the check can fail


def test_a_shard_with_only_rejects_is_an_empty_shard_with_the_metadata(tmp_path, client):
    write_stage(tmp_path / "clean", [good_rows("g", 2), bad_rows()])
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)
    check_accounting(tmp_path / "embed", 7)
    empty = tmp_path / "embed" / "part-00001.parquet"
    assert pq.read_metadata(empty).num_rows == 0 and shard_metadata(str(empty))["dim"] == 64


def test_resume_after_a_deleted_shard_redoes_only_it(tmp_path, client):
    write_stage(tmp_path / "clean", [good_rows("r", 3), good_rows("s", 3), good_rows("t", 3)])
    out = tmp_path / "embed"
    embed(str(tmp_path / "clean"), str(out), EmbedConfig(**TINY), client)
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    before = pq.read_table(out / "part-00001.parquet")
    (out / "part-00001.parquet").unlink()
    embed(str(tmp_path / "clean"), str(out), EmbedConfig(**TINY), client)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert after["part-00000.parquet"] == times["part-00000.parquet"] and after["part-00002.parquet"] == times["part-00002.parquet"]
    assert pq.read_table(out / "part-00001.parquet").equals(before)
    check_accounting(out, 9)


def test_another_model_is_refused_on_a_rerun(tmp_path, client):
    write_stage(tmp_path / "clean", [good_rows("m", 2)])
    scorer = cached_clip("dallekit-tiny-clip", None, None, "cpu")
    checkpoint = save_clip(scorer, "dallekit-tiny-clip", tmp_path / "clip")
    config = EmbedConfig(clip_model="dallekit-tiny-clip", clip_pretrained=None, clip_checkpoint=str(checkpoint), device="cpu")
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), config, client)
    with pytest.raises(BadInputError, match="model"):
        embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)  # random weights: another CLIP
    # the same checkpoint folder retrained in place (other weights) is another model too
    other = cached_clip("dallekit-tiny-clip", None, str(checkpoint), "cpu")
    for parameter in other.model.parameters():
        parameter.data.add_(0.01)
    save_clip(other, "dallekit-tiny-clip", checkpoint)
    with pytest.raises(BadInputError, match="model"):
        embed(str(tmp_path / "clean"), str(tmp_path / "embed"), config, client)


def test_an_empty_stage_is_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "clean"
    folder.mkdir()
    pq.write_table(pa.table({"uid": pa.array([], pa.string()), "caption": pa.array([], pa.string()), "jpg": pa.array([], pa.binary())}),
                   folder / "part-00000.parquet")
    (folder / "_stats.json").write_text(json.dumps({"stage": "clean", "rows_in": 0, "rows_out": 0}))
    (folder / "_SUCCESS").write_text("")
    code, err = run_cli(capsys, "embed", folder, "--out", tmp_path / "embed", "--clip-model", "dallekit-tiny-clip")
    assert code == 2 and err.count("\n") == 1 and str(folder) in err and "no rows" in err, err
    with pytest.raises(BadInputError, match="no rows"):
        plan_embed(str(folder), EmbedConfig(**TINY))
