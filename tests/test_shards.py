"""The stage runner: atomic shards, rejects, per-shard marks, resume, and row accounting."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from dallekit.pipeline.shards import ShardResult, ShardTask, run_stage
from dallekit.pipeline.stage import Stage

CALLS = "calls.txt"


def split_even(payload):
    """Keep even numbers, reject odd ones; record each call in a file beside the output."""
    numbers, log = payload
    with open(log, "a") as f:
        f.write(f"{numbers[0]}\n")
    table = pa.table({"uid": [str(n) for n in numbers], "n": numbers})
    even = pa.array([n % 2 == 0 for n in numbers])
    rejects = table.filter(pa.compute.invert(even)).append_column("reason", pa.array(["odd"] * sum(n % 2 for n in numbers)))
    return ShardResult(rows_in=len(numbers), kept=table.filter(even), rejects=rejects, counters={"first": {str(numbers[0]): 1}})


def toy(process) -> Stage:
    """A stage of hand-made tasks: only its name and shard function matter to the runner."""
    return Stage("toy", (), frozenset(), "toy tasks", process)


def tasks(log):
    return [ShardTask(f"part-{i:05d}", ([i * 10 + k for k in range(10)], str(log))) for i in range(4)]


def test_stage_writes_shards_rejects_marks_and_stats(tmp_path, client):
    out = tmp_path / "out"
    stats = run_stage(toy(split_even), str(out), tasks(tmp_path / CALLS), client)
    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (40, 20, 20)
    assert stats["reasons"] == {"odd": 20} and stats["counters"]["first"] == {"0": 1, "10": 1, "20": 1, "30": 1}
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(4)]
    assert len(list((out / "_rejects").glob("part-*.parquet"))) == 4
    assert json.loads((out / "_stats.json").read_text())["rows_out"] == 20 and (out / "_SUCCESS").exists()


def test_resume_skips_complete_shards_and_redoes_the_rest(tmp_path, client):
    out, log = tmp_path / "out", tmp_path / CALLS
    run_stage(toy(split_even), str(out), tasks(log), client)
    # simulate a run killed after two shards: drop the marks of two, leave a torn temporary file
    for name in ("part-00001", "part-00003"):
        (out / "_progress" / f"{name}.json").unlink()
    (out / "_SUCCESS").unlink()
    (out / "_tmp-deadbeef-part-00003.parquet").write_bytes(b"torn")
    log.write_text("")
    stats = run_stage(toy(split_even), str(out), tasks(log), client)
    assert sorted(log.read_text().split()) == ["10", "30"]  # only the unfinished shards ran again
    assert stats["rows_in"] == 40 and not list(out.glob("_tmp-*"))


def test_accounting_mismatch_is_a_bug_not_silence(tmp_path, client):
    def loses_a_row(payload):
        return ShardResult(rows_in=3, kept=pa.table({"uid": ["a", "b"]}))

    with pytest.raises(RuntimeError, match="3 rows in but 2 kept"):
        run_stage(toy(loses_a_row), str(tmp_path / "out"), [ShardTask("part-00000", None)], client, retries=0)
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_read_shard_refuses_columns_the_file_lacks(tmp_path):
    import pyarrow.parquet as pq

    from dallekit.errors import BadInputError
    from dallekit.io import read_shard

    pq.write_table(pa.table({"uid": ["a"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(BadInputError, match=r"part-00000.parquet: missing column\(s\) caption"):
        read_shard(str(tmp_path / "part-00000.parquet"), ["uid", "caption"])
    (tmp_path / "part-00001.parquet").mkdir()
    with pytest.raises(BadInputError, match="a folder where a Parquet shard was expected"):
        read_shard(str(tmp_path / "part-00001.parquet"))


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_image_bytes_are_written_plain_and_other_columns_with_the_codec(tmp_path, codec):
    import pyarrow.parquet as pq

    from dallekit.io import read_shard, write_table_atomic

    images = [bytes([i]) * 5000 for i in range(40)]  # compressible, so a codec would show
    table = pa.table({"uid": [f"u{i % 3}" for i in range(40)], "jpg": pa.array(images, pa.binary())})
    path = tmp_path / "part-00000.parquet"
    write_table_atomic(table, str(path), **({"compression": codec} if codec else {}))
    group = pq.ParquetFile(path).metadata.row_group(0)
    uid, jpg = group.column(0), group.column(1)
    assert jpg.compression == "UNCOMPRESSED" and not jpg.is_stats_set
    assert not any("DICTIONARY" in e for e in jpg.encodings) and jpg.total_compressed_size >= sum(map(len, images))
    assert uid.compression == (codec or "snappy").upper() and uid.is_stats_set and any("DICTIONARY" in e for e in uid.encodings)
    assert read_shard(str(path)).equals(table)
