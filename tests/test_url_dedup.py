"""The URL dedup passes of ingest and adopt: the first row of a URL keeps it, and a damaged pass output is redone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dallekit.config import IngestConfig
from dallekit.pipeline import ingest as ingest_module
from dallekit.pipeline import stage as stage_module
from dallekit.pipeline.hashing import string_hash
from dallekit.pipeline.ingest import ingest
from dallekit.pipeline.passes import work_dir
from dallekit.pipeline.url_dedup import repeats
from tests.helpers import read_stage


@pytest.mark.parametrize("hashes", ["of the URLs", "all equal"])
def test_repeats_are_the_later_rows_of_a_url_with_its_first_rows_uid(hashes):
    """The first row of a URL keeps it; URLs that share a hash (forced here) are still told apart by value."""
    rng = np.random.default_rng(0)
    urls = pa.array([f"http://example.com/{i}.jpg" for i in rng.integers(0, 300, 2000)])
    url_hash = string_hash(urls) if hashes == "of the URLs" else np.full(2000, 7, np.uint64)
    rows = pa.table({"url": urls, "uid": [f"u{i}" for i in range(2000)], "_order": np.arange(2000, dtype=np.int64) * 3,
                     "url_hash": url_hash})
    df = rows.to_pandas()
    later = df.duplicated("url", keep="first")
    first_uid = df[~later].set_index("url")["uid"]
    found = repeats(rows)
    assert found.column("_order").to_pylist() == df["_order"][later].tolist()
    assert found.column("duplicate_of").to_pylist() == df["url"][later].map(first_uid).tolist()


def test_string_hash_reads_every_byte_and_not_where_a_value_lies():
    urls = pa.array([f"https://cdn.example.com/{i:06d}/large/photo.jpg" for i in range(4000)])  # differ in the middle only
    hashes = string_hash(urls)
    assert len(set(hashes.tolist())) == 4000
    assert (string_hash(pa.chunked_array([urls[:1000], urls[1000:]])) == hashes).all()
    assert (string_hash(urls.slice(7, 10)) == hashes[7:17]).all()
    assert string_hash(pa.array(["ab", "ab\x00", ""])).tolist()[:2] != [string_hash(pa.array(["ab"]))[0]] * 2
    counts = np.bincount((hashes % np.uint64(8)).astype(int), minlength=8)
    assert counts.min() > 350  # 500 expected per bucket


PASS_OUTPUTS = {"urls": "*.arrows", "dups": "*.arrows", "block_dups": "b-*.parquet"}  # the last of each: its block holds repeats


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
@pytest.mark.parametrize("folder", sorted(PASS_OUTPUTS))
def test_a_damaged_url_dedup_output_with_its_mark_is_redone(tmp_path, client, monkeypatch, folder, damage):
    """A run stopped after the URL passes; one pass output damaged, its mark kept; the rerun rewrites it and ends as a clean run."""
    lines = [f"caption number {i}\thttp://example.com/{i % 700}.jpg\n" for i in range(1000)]
    (tmp_path / "in.tsv").write_text("".join(lines))
    config = IngestConfig(format="cc3m", shard_size=300, block_bytes=8000)
    ingest([str(tmp_path / "in.tsv")], str(tmp_path / "clean"), config, client)

    def stop(*args) -> None:
        raise RuntimeError("stopped after the URL passes")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "write_file_roots", stop)
        with pytest.raises(RuntimeError, match="stopped"):
            ingest([str(tmp_path / "in.tsv")], str(out), config, client)
    target = sorted((Path(work_dir(str(out))) / folder).glob(PASS_OUTPUTS[folder]))[-1]
    whole = target.read_bytes()
    if damage == "deleted":
        target.unlink()
    else:
        target.write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(stage_module, "remove_work_dir", lambda output_dir: None)  # keep the scratch folder to look at
    ingest([str(tmp_path / "in.tsv")], str(out), config, client)
    assert Path(target).read_bytes() == whole  # redone, not trusted by its mark
    kept, rejects, stats = read_stage(out)
    clean_kept, clean_rejects, _ = read_stage(tmp_path / "clean")
    assert kept.equals(clean_kept) and rejects.equals(clean_rejects) and len(rejects) == 300
    assert stats["rows_in"] == 1000 and pd.concat([kept["uid"], rejects["uid"]]).is_unique
