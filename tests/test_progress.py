"""Progress in logs: plain lines at an interval when stderr is not a terminal, tqdm's bar on one."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from dallekit.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_never_carriage_returns(monkeypatch):
    monkeypatch.setenv("DALLEKIT_PROGRESS_SECONDS", "0")  # a line per update
    out = io.StringIO()
    with progress(total=3, desc="download", unit="shard", stream=out) as bar:
        for _ in range(3):
            bar.update(1)
        bar.set_postfix(loss="0.512")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4  # three updates and the close
    assert lines[0].startswith("download: 1/3 shards, ") and ", eta " in lines[0]
    assert lines[-1].startswith("download: 3/3 shards, ") and "done in" in lines[-1] and lines[-1].endswith("loss=0.512")


def test_lines_come_at_most_once_per_interval(monkeypatch):
    monkeypatch.setenv("DALLEKIT_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    for _ in progress(range(1000), desc="train", unit="step", stream=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 1000/1000 steps")  # the last line only


def test_a_terminal_keeps_the_bar():
    bar = progress(total=2, desc="clean", stream=Terminal())
    assert not isinstance(bar, LineProgress)
    bar.close()
    assert isinstance(progress(total=2, stream=io.StringIO()), LineProgress)


def test_resumed_progress_counts_its_rate_from_where_it_started(monkeypatch):
    monkeypatch.setenv("DALLEKIT_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    bar = progress(total=10, initial=8, desc="encode", unit="shard", stream=out)
    bar.update(2)
    bar.close()
    assert out.getvalue().startswith("encode: 10/10 shards, ")


@pytest.mark.parametrize("bad", ["soon", "-5"])
def test_a_bad_interval_falls_back_or_clamps(monkeypatch, bad):
    from dallekit.progress import log_interval

    monkeypatch.setenv("DALLEKIT_PROGRESS_SECONDS", bad)
    assert log_interval() == (30.0 if bad == "soon" else 0.0)


def test_a_piped_stage_command_writes_no_carriage_returns(tmp_path):
    (tmp_path / "in.tsv").write_text("a red circle\thttp://example.com/1.jpg\na blue square\thttp://example.com/2.jpg\n")
    env = os.environ | {"DALLEKIT_PROGRESS_SECONDS": "3600"}
    done = subprocess.run([sys.executable, "-m", "dallekit.cli", "ingest", str(tmp_path / "in.tsv"), "--out", str(tmp_path / "out"),
                           "--workers", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\r" not in done.stdout
    assert any(line.startswith("ingest: 1/1 shards, ") for line in done.stderr.splitlines()), done.stderr
