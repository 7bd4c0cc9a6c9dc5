"""ingest: every input format, rejects with reasons, exact shard sizes, streaming blocks, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import IngestConfig
from dallekit.errors import BadInputError
from dallekit.pipeline import ingest as ingest_module
from dallekit.pipeline.ingest import ingest, ingest_blocks, make_uid, plan_ingest
from tests.helpers import check_accounting, read_stage, run_cli

ROWS = [
    ("a red circle on a blue background", "http://example.com/1.jpg"),
    ("a green square on a white background", "https://example.com/2.jpg"),
    ("a repeated url", "http://example.com/1.jpg"),
    ("", "http://example.com/3.jpg"),
    ("no url at all", ""),
    ("an ftp url", "ftp://example.com/4.jpg"),
    ("a local file", "file:///tmp/5.jpg"),
    ("  a blue triangle  ", "http://example.com/6.jpg"),
]
EXPECTED_REASONS = {"duplicate_url": 1, "empty_caption": 1, "empty_url": 1, "invalid_url_scheme": 1, "file_url_not_allowed": 1}


def expect_standard(out, client_rows=len(ROWS)):
    kept, rejects = check_accounting(out, client_rows)
    assert kept["url"].tolist() == ["http://example.com/1.jpg", "https://example.com/2.jpg", "http://example.com/6.jpg"]
    assert rejects["reason"].value_counts().to_dict() == EXPECTED_REASONS
    dup = rejects[rejects.reason == "duplicate_url"].iloc[0]
    assert dup["duplicate_of"] == kept["uid"].iloc[0]
    assert kept["uid"].iloc[0] == make_uid("http://example.com/1.jpg", "a red circle on a blue background")
    return kept, rejects


def test_cc3m_tsv(tmp_path, client):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("".join(f"{c}\t{u}\n" for c, u in ROWS))
    ingest([str(src)], str(tmp_path / "out"), IngestConfig(), client)
    kept, _ = expect_standard(tmp_path / "out")
    assert list(kept.columns) == ["uid", "url", "caption"]


def test_csv_with_extra_columns_and_custom_names(tmp_path, client):
    df = pd.DataFrame({"TEXT_X": [c for c, _ in ROWS], "link": [u for _, u in ROWS], "license": ["cc-by"] * len(ROWS), "width": ["9"] * len(ROWS)})
    df.to_csv(tmp_path / "in.csv", index=False)
    ingest([str(tmp_path / "in.csv")], str(tmp_path / "out"), IngestConfig(url_col="link", caption_col="TEXT_X"), client)
    kept, _ = expect_standard(tmp_path / "out")
    assert list(kept.columns) == ["uid", "url", "caption", "license", "source_width"]  # later stages own `width`
    assert set(kept["license"]) == {"cc-by"}


def test_tsv_with_header_jsonl_and_parquet(tmp_path, client):
    df = pd.DataFrame({"url": [u for _, u in ROWS], "caption": [c for c, _ in ROWS], "score": [0.5] * len(ROWS)})
    df.to_csv(tmp_path / "in.tsv", sep="\t", index=False)
    df.to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "in.parquet")
    for name in ("in.tsv", "in.jsonl", "in.parquet"):
        out = tmp_path / f"out-{name}"
        ingest([str(tmp_path / name)], str(out), IngestConfig(), client)
        kept, _ = expect_standard(out)
        assert kept["score"].astype(float).tolist() == [0.5] * 3, name


def test_laion_parquet_keeps_its_columns(tmp_path, client):
    table = pa.table(
        {
            "URL": [u for _, u in ROWS], "TEXT": [c for c, _ in ROWS], "WIDTH": [512] * len(ROWS), "HEIGHT": [384] * len(ROWS),
            "similarity": [0.31] * len(ROWS), "punsafe": [0.01] * len(ROWS), "pwatermark": [0.2] * len(ROWS),
        }
    )
    pq.write_table(table, tmp_path / "laion.parquet", row_group_size=3)  # several row groups = several blocks
    ingest([str(tmp_path / "laion.parquet")], str(tmp_path / "out"), IngestConfig(), client)
    kept, _ = expect_standard(tmp_path / "out")
    assert {"WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark"} <= set(kept.columns)
    assert kept["punsafe"].dtype == "float64"


def test_image_folder_becomes_file_urls(tmp_path, client):
    import random

    from dallekit.demo.synthetic import encode, random_spec, render

    folder = tmp_path / "images"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(3):
        spec = random_spec(rng, width=64, height=64)
        (folder / f"{i}.jpg").write_bytes(encode(render(spec)))
        if i < 2:
            (folder / f"{i}.txt").write_text(spec.caption + "\n")
    ingest([str(folder)], str(tmp_path / "out"), IngestConfig(), client)
    kept, rejects = check_accounting(tmp_path / "out", 3)
    assert all(u.startswith("file://") and u.endswith(".jpg") for u in kept["url"])
    assert rejects["reason"].tolist() == ["empty_caption"]  # 2.jpg has no .txt


def test_file_urls_allowed_on_request(tmp_path, client):
    (tmp_path / "in.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in ROWS))
    ingest([str(tmp_path / "in.tsv")], str(tmp_path / "out"), IngestConfig(format="cc3m", allow_file_urls=True), client)
    kept, rejects = check_accounting(tmp_path / "out", len(ROWS))
    assert "file:///tmp/5.jpg" in set(kept["url"])
    assert "file_url_not_allowed" not in set(rejects["reason"])


def test_glob_and_blocks_give_exact_shards_and_global_dedup(tmp_path, client):
    """Many small blocks across two files: shards hold exactly shard_size input rows; dedup is global."""
    lines = [f"caption number {i}\thttp://example.com/{i % 700}.jpg\n" for i in range(1000)]
    (tmp_path / "a.tsv").write_text("".join(lines[:500]))
    (tmp_path / "b.tsv").write_text("".join(lines[500:]))
    config = IngestConfig(format="cc3m", shard_size=300, block_bytes=2000)
    ingest([str(tmp_path / "*.tsv")], str(tmp_path / "out"), config, client)
    kept, rejects = check_accounting(tmp_path / "out", 1000)
    assert len(kept) == 700 and set(rejects["reason"]) == {"duplicate_url"}
    shard_rows = [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "out").glob("part-*.parquet"))]
    assert len(shard_rows) == 4  # 300 + 300 + 300 + 100 input rows
    assert kept["caption"].tolist() == [f"caption number {i}" for i in range(700)]  # input order, first kept
    # the same input read as one block gives the same shards
    ingest([str(tmp_path / "*.tsv")], str(tmp_path / "one"), IngestConfig(format="cc3m", shard_size=300), client)
    assert read_stage(tmp_path / "one")[0].equals(kept)


@pytest.mark.slow
def test_more_buckets_than_blocks_and_shards_keep_the_global_dedup(tmp_path, client, monkeypatch):
    """Buckets follow the input size without a cap; each shard reads its repeats from its blocks' files."""
    monkeypatch.setattr(ingest_module, "BUCKET_BYTES", 150)  # 300 buckets (more than the old cap of 256)
    lines = [f"caption number {i}\thttp://example.com/{i % 700}.jpg\n" for i in range(1000)]
    (tmp_path / "a.tsv").write_text("".join(lines))
    ingest([str(tmp_path / "a.tsv")], str(tmp_path / "out"), IngestConfig(format="cc3m", shard_size=300, block_bytes=5000), client)
    kept, rejects = check_accounting(tmp_path / "out", 1000)
    assert kept["caption"].tolist() == [f"caption number {i}" for i in range(700)]
    assert set(rejects["reason"]) == {"duplicate_url"} and len(rejects) == 300
    by_uid = dict(zip(kept["url"], kept["uid"]))
    assert all(by_uid[u] == d for u, d in zip(rejects["url"], rejects["duplicate_of"]))


def test_a_parquet_row_group_bigger_than_a_task_is_read_in_slices(tmp_path, client, monkeypatch):
    monkeypatch.setattr(ingest_module, "PARQUET_BLOCK_ROWS", 40)
    monkeypatch.setattr(ingest_module, "PARQUET_BATCH_ROWS", 16)  # slices that start and end inside batches
    rows = [(f"http://example.com/{i % 90}.jpg", f"caption {i}") for i in range(100)]
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "one.parquet",
                   row_group_size=1000)  # one row group of 100 rows
    blocks = ingest_blocks([str(tmp_path / "one.parquet")], IngestConfig())
    assert [b.rows for b in blocks] == [(0, 40), (40, 80), (80, 100)]
    ingest([str(tmp_path / "one.parquet")], str(tmp_path / "out"), IngestConfig(shard_size=30), client)
    kept, rejects = check_accounting(tmp_path / "out", 100)
    assert kept["caption"].tolist() == [f"caption {i}" for i in range(90)]  # input order, each row once
    assert len(rejects) == 10 and set(rejects["reason"]) == {"duplicate_url"}


def image_tree(root, layout: dict[str, int]) -> int:
    """Tiny JPEGs with captions in nested folders: {relative folder: number of images}; returns the total."""
    import random

    from dallekit.demo.synthetic import encode, random_spec, render

    rng = random.Random(0)
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            spec = random_spec(rng, width=32, height=32)
            (root / folder / f"{i}.jpg").write_bytes(encode(render(spec)))
            (root / folder / f"{i}.txt").write_text(f"{folder} {i} {spec.caption}")
    return sum(layout.values())


def test_folder_blocks_hold_counts_not_file_names(tmp_path, client, monkeypatch):
    monkeypatch.setattr(ingest_module, "FOLDER_CHUNK", 4)
    layout = {".": 3, "a": 5, "a/b": 1, "c": 6, "c/d/e": 2}
    total = image_tree(tmp_path / "images", layout)
    blocks = ingest_blocks([str(tmp_path / "images")], IngestConfig())
    assert [b.images for b in blocks] == [4, 4, 4, 4, 1]
    for b in blocks:  # (folder, start, stop, count) slices only: the driver never lists the tree's file names
        assert all(isinstance(count, int) and 0 <= start < stop <= count for _, start, stop, count in b.folders)
    ingest([str(tmp_path / "images")], str(tmp_path / "out"), IngestConfig(), client)
    kept, _ = check_accounting(tmp_path / "out", total)
    expected = {f"{folder} {i}" for folder, n in layout.items() for i in range(n)}
    assert {" ".join(c.split()[:2]) for c in kept["caption"]} == expected and len(kept) == total


def test_folder_changed_after_planning_is_bad_input(tmp_path, client):
    image_tree(tmp_path / "images", {"a": 3})
    plan = plan_ingest([str(tmp_path / "images")], IngestConfig())
    (tmp_path / "images" / "a" / "0.jpg").unlink()
    with pytest.raises(BadInputError, match=r"images/a: had 3 images when ingest started and 2 now"):
        ingest([str(tmp_path / "images")], str(tmp_path / "out"), IngestConfig(), client, plan=plan)


def test_rerun_of_complete_stage_is_a_no_op(tmp_path, client):
    (tmp_path / "in.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in ROWS))
    first = ingest([str(tmp_path / "in.tsv")], str(tmp_path / "out"), IngestConfig(), client)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = ingest([str(tmp_path / "in.tsv")], str(tmp_path / "out"), IngestConfig(), client)
    assert first["rows_in"] == len(ROWS) and again == json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert again["seconds"] == first["seconds"]  # the first run's stats, not a second run's
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == written  # nothing rewritten


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        ("missing.csv", "link,caption\nhttp://x/1.jpg,a cat\n", [], "no URL column 'url'"),
        ("nocap.csv", "url,text\nhttp://x/1.jpg,a cat\n", [], "no caption column 'caption'"),
        ("empty.csv", "", [], "file is empty"),
        ("garbage.csv", bytes(range(256)) * 20, [], "not UTF-8"),
        ("garbage.parquet", b"PAR1" + bytes(range(200)), [], "not a readable Parquet file"),
        ("bad.jsonl", '{"url": "http://x/1.jpg", "caption": "a"}\n{not json\n', [], "invalid JSON"),
        ("list.txt", "http://x/1.jpg\n", [], "unknown format"),
        ("cc.tsv", "just one field\n", ["--format", "cc3m"], "caption<TAB>url"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, name, content, extra, message):
    src = tmp_path / name
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_cli(capsys, "ingest", str(src), "--out", str(tmp_path / "out"), *extra)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert name in err and message in err


def test_missing_input_and_bad_option(tmp_path, capsys):
    code, err = run_cli(capsys, "ingest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no such file or folder" in err and "nope.csv" in err
    code, err = run_cli(capsys, "ingest", "x.csv", "--out", "o", "--shard-size", "many")
    assert code == 2 and "--shard-size" in err and err.count("\n") == 1
