"""Helpers the tests share: read a stage folder with plain pyarrow, check its row accounting, call the CLI in-process."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dallekit.cli import main


def read_stage(path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Kept rows, rejected rows and stats of a stage folder, read with plain pyarrow."""
    kept = [pq.read_table(p).to_pandas() for p in sorted(path.glob("part-*.parquet"))]
    rejects = [pq.read_table(p).to_pandas() for p in sorted((path / "_rejects").glob("part-*.parquet"))]
    stats = json.loads((path / "_stats.json").read_text())
    kept_df = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()
    rejects_df = pd.concat(rejects, ignore_index=True) if rejects else pd.DataFrame(columns=["uid", "reason"])
    return kept_df, rejects_df, stats


def check_accounting(path, rows_in: int, exact_duplicate_rows: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rows in = rows out + rows rejected, in the files and in _stats.json; no uid appears twice.

    An input row repeated exactly (same URL and caption) has the same uid as the row ingest
    kept, so only there may a rejected uid repeat a kept one.
    """
    kept, rejects, stats = read_stage(path)
    assert stats["rows_in"] == rows_in
    assert stats["rows_out"] == len(kept) and stats["rows_rejected"] == len(rejects)
    assert len(kept) + len(rejects) == rows_in
    assert kept["uid"].is_unique
    if not exact_duplicate_rows:
        assert pd.concat([kept["uid"], rejects["uid"]]).is_unique
    assert (path / "_SUCCESS").exists()
    return kept, rejects


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()


def run_cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of one in-process `dallekit` call (what earlier calls printed is dropped first)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err
