"""embed: unit-norm float16 CLIP vectors with the model in the metadata, rejects and their reasons, resume, the fingerprint."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import EmbedConfig
from dallekit.errors import BadInputError
from dallekit.images import decode_rgb
from dallekit.models.clip import cached_clip, save_clip
from dallekit.pipeline.embed import embed, embed_shard, plan_embed
from dallekit.pipeline.embeddings import FORMAT, embedding_matrix, folder_metadata, model_identity, shard_metadata
from dallekit.pipeline.filter import scorer_input_size
from tests.helpers import check_accounting, run_cli
from tests.stage_data import downloaded_row, noise_jpeg, png_header_only, shape_jpeg, write_stage

TINY = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None, device="cpu")


def good_rows(prefix: str, n: int) -> list[dict]:
    seed = zlib.crc32(prefix.encode()) % 1000  # not hash(): str hashes differ between processes
    return [downloaded_row(f"{prefix}{i:03d}", f"a shape number {i}", shape_jpeg(seed + i, size=96)) for i in range(n)]


def bad_rows() -> list[dict]:
    """One row per reject reason: no bytes (a failed download), over 64 Mpx by the header, a cut-off JPEG, not an image."""
    return [
        downloaded_row("failed", "a failed download", None, status="failed_to_download"),
        downloaded_row("empty", "no bytes at all", b""),
        downloaded_row("huge", "a huge png", png_header_only(9000, 9000)),
        downloaded_row("cut", "a truncated jpeg", shape_jpeg(7, size=96)[:200]),
        downloaded_row("text", "not an image", b"hello, world"),
    ]


def embed_in_process(folder, config: EmbedConfig) -> list[tuple[pa.Table, pa.Table | None]]:
    """Each shard's (kept table, rejects) from the stage's own task function, run here (no cluster)."""
    plan = plan_embed(str(folder), config)
    results = []
    for task in plan.tasks(None, str(folder.parent / "unused")):
        result = embed_shard(task.payload)
        batches = list(result.kept)
        results.append((pa.concat_tables(batches), result.rejects))
        assert result.rows_in == results[-1][0].num_rows + (result.rejects.num_rows if result.rejects is not None else 0)
    return results


def test_vectors_are_unit_float16_with_the_model_in_the_schema_and_rejects_have_reasons(tmp_path):
    shards = [good_rows("a", 5) + bad_rows()[:3], bad_rows()[3:] + good_rows("b", 4)]
    write_stage(tmp_path / "clean", shards)
    results = embed_in_process(tmp_path / "clean", EmbedConfig(**TINY, batch_size=3))
    kept = [u for table, _ in results for u in table.column("uid").to_pylist()]
    assert kept == [r["uid"] for s in shards for r in s if r["uid"][0] in "ab"]  # input order, across batches
    reasons = {u: r for _, rejects in results for u, r in zip(rejects.column("uid").to_pylist(), rejects.column("reason").to_pylist())}
    assert reasons == {"failed": "no_image", "empty": "no_image", "huge": "image_too_large", "cut": "undecodable", "text": "undecodable"}
    for table, _ in results:
        assert table.column_names == ["uid", "image_embedding", "text_embedding"]
        assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 64)
        meta = json.loads(table.schema.metadata[b"dallekit"])
        assert meta == {"format": FORMAT, "model": model_identity("dallekit-tiny-clip", None, None), "dim": 64}
        for column in ("image_embedding", "text_embedding"):
            vectors = embedding_matrix(table.column(column))
            assert vectors.dtype == np.float16 and vectors.shape == (table.num_rows, 64)
            assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)


def test_image_embedding_equals_the_scorers_of_the_decoded_image(tmp_path):
    rows = good_rows("e", 3) + [downloaded_row("noise", "random pixels", noise_jpeg(1, size=96))]
    write_stage(tmp_path / "clean", [rows])
    [(table, _)] = embed_in_process(tmp_path / "clean", EmbedConfig(**TINY, batch_size=3))
    scorer = cached_clip("dallekit-tiny-clip", None, None, "cpu")
    uids = table.column("uid").to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    images = [decode_rgb(by_uid[u]["jpg"], draft_size=scorer_input_size(scorer)) for u in uids]
    expected = scorer.embed_images(images).numpy()
    texts = scorer.embed_texts([by_uid[u]["caption"] for u in uids]).numpy()
    assert np.abs(embedding_matrix(table.column("image_embedding")).astype(np.float32) - expected).max() < 2e-3
    assert np.abs(embedding_matrix(table.column("text_embedding")).astype(np.float32) - texts).max() < 2e-3
    assert np.abs(expected[0] - expected[-1]).max() > 1e-2  # a shape and noise give different vectors: the check can fail


@pytest.mark.slow
def test_the_stage_accounts_for_every_row_and_an_all_rejected_shard_carries_the_metadata(tmp_path, client):
    write_stage(tmp_path / "clean", [good_rows("g", 3), bad_rows()])
    stats = embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)
    check_accounting(tmp_path / "embed", 8)
    assert stats["reasons"] == {"no_image": 2, "image_too_large": 1, "undecodable": 2}
    assert json.loads((tmp_path / "embed" / "_funnel.json").read_text())["steps"][-1]["remaining"] == 3
    empty = tmp_path / "embed" / "part-00001.parquet"
    assert pq.read_metadata(empty).num_rows == 0 and shard_metadata(str(empty))["dim"] == 64
    assert folder_metadata(str(tmp_path / "embed"))["model"]["model"] == "dallekit-tiny-clip"


@pytest.mark.slow
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


@pytest.mark.slow
def test_another_model_is_refused_on_a_rerun(tmp_path, client):
    write_stage(tmp_path / "clean", [good_rows("m", 2)])
    scorer = cached_clip("dallekit-tiny-clip", None, None, "cpu")
    checkpoint = save_clip(scorer, "dallekit-tiny-clip", tmp_path / "clip")
    config = EmbedConfig(clip_model="dallekit-tiny-clip", clip_pretrained=None, clip_checkpoint=str(checkpoint), device="cpu")
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), config, client)
    with pytest.raises(BadInputError, match=r"model\.checkpoint .* -> "):
        embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)  # random weights: another CLIP
    # the same checkpoint folder retrained in place (other weights) is another model too
    other = cached_clip("dallekit-tiny-clip", None, str(checkpoint), "cpu")
    for parameter in other.model.parameters():
        parameter.data.add_(0.01)
    save_clip(other, "dallekit-tiny-clip", checkpoint)
    with pytest.raises(BadInputError, match=r"model\.checkpoint .* -> "):
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


@pytest.mark.slow
def test_the_cli_embeds_with_a_train_clip_folder_and_a_rerun_is_complete(tmp_path, capsys):
    write_stage(tmp_path / "clean", [good_rows("c", 3)])
    checkpoint = save_clip(cached_clip("dallekit-tiny-rn-clip", None, None, "cpu"), "dallekit-tiny-rn-clip", tmp_path / "clip")
    args = ["embed", tmp_path / "clean", "--out", tmp_path / "embed", "--clip-checkpoint", checkpoint, "--batch-size", "2",
            "--device", "cpu", "--workers", "1"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    kept, _ = check_accounting(tmp_path / "embed", 3)
    assert embedding_matrix(pa.array(kept["image_embedding"].tolist(), pa.list_(pa.float16(), 64))).shape == (3, 64)
    assert folder_metadata(str(tmp_path / "embed"))["model"]["checkpoint"] == model_identity("x", None, str(checkpoint))["checkpoint"]
    assert run_cli(capsys, *args)[0] == 0  # the finished run is answered from its stats


@pytest.mark.slow
def test_embeds_an_adopted_img2dataset_folder(tmp_path, client):
    from dallekit.config import AdoptConfig
    from dallekit.pipeline.adopt import adopt
    from tests.test_adopt import img2dataset_parquet

    urls = img2dataset_parquet(tmp_path, 12, seed=3, broken_fraction=0.25)
    adopt(str(tmp_path / "img2dataset"), str(tmp_path / "adopted"), AdoptConfig(), client)
    adopted, _ = check_accounting(tmp_path / "adopted", urls)
    stats = embed(str(tmp_path / "adopted"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)
    kept, rejects = check_accounting(tmp_path / "embed", len(adopted))
    failed = adopted[adopted["jpg"].isna()]
    assert len(failed) and set(rejects["uid"]) == set(failed["uid"]) and set(rejects["reason"]) == {"no_image"}
    assert set(kept["uid"]) == set(adopted["uid"]) - set(failed["uid"]) and stats["rows_out"] == len(kept)


def run_pipeline_toml(**sections: dict) -> dict:
    return {"run": {"inputs": ["urls.csv"], "out": "/tmp/run"}} | sections


def test_the_run_embeds_with_the_filters_clip_and_the_filter_reads_the_embeddings():
    from dallekit.jobs.steps import RUN_STEP_TABLE, RunState, load_pipeline, run_filter_clip, run_folders

    p = load_pipeline(run_pipeline_toml(filter={"clip_model": "dallekit-tiny-clip", "clip_pretrained": "x.safetensors"},
                                        embed={"batch_size": 8, "clip_model": "dallekit-tiny-clip"}), "p.toml")
    state = RunState(p, run_folders(p.run.out), client=None, timer=None, judge=None, plans={})
    step = {s.name: s for s in RUN_STEP_TABLE}
    assert state.embed_config.batch_size == 8 and state.embed_config.clip_pretrained == "x.safetensors"
    assert state.filter_config.embeddings == "/tmp/run/embed" and step["embed"].needed(state)
    off = replace(state, pipeline=replace(p, filter=replace(p.filter, clip=False)))
    assert not step["embed"].needed(off) and off.filter_config.embeddings is None
    semantic = load_pipeline(run_pipeline_toml(filter={"clip": False, "semantic_dedup_eps": 0.05}), "p.toml")  # not refused before the run sets embeddings
    dedup_only = replace(state, pipeline=semantic)
    assert step["embed"].needed(dedup_only) and dedup_only.filter_config.embeddings == "/tmp/run/embed"
    trained = load_pipeline(run_pipeline_toml(run={"inputs": ["u.csv"], "out": "/tmp/run", "train_clip": True}), "p.toml")
    assert run_filter_clip(trained).clip_checkpoint == "/tmp/run/clip"  # the CLIP the run trains embeds and filters


@pytest.mark.parametrize("embed_section", [{"clip_model": "RN50"}, {"clip_pretrained": "openai"}, {"clip_checkpoint": "elsewhere"}])
def test_an_embed_clip_other_than_the_filters_is_one_line_exit_2(tmp_path, capsys, embed_section):
    from dallekit.jobs.steps import load_pipeline

    with pytest.raises(BadInputError, match=r"\[embed\]: clip_\w+ = .*set the CLIP in \[filter\] only"):
        load_pipeline(run_pipeline_toml(embed=embed_section), "p.toml")
    key, value = next(iter(embed_section.items()))
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    config = tmp_path / "p.toml"
    config.write_text(f'[run]\ninputs = ["{tmp_path / "urls.csv"}"]\n[embed]\n{key} = "{value}"\n')
    code, err = run_cli(capsys, "run", "--config", config, "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and f"[embed]: {key}" in err and not (tmp_path / "o").exists(), err


def test_vector_columns_are_stored_plain(tmp_path):
    """A dictionary and snappy on float16 vectors made semantic dedup's reads 3x slower, for 8% less disk."""
    from dallekit.io import write_table_atomic
    from dallekit.pipeline.embeddings import embedding_array

    table = pa.table({"uid": ["a", "b"], "image_embedding": embedding_array(np.eye(2, 8))})
    write_table_atomic(table, str(tmp_path / "part-00000.parquet"))
    column = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata.row_group(0).column(1)
    assert column.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in column.encodings and not column.is_stats_set
