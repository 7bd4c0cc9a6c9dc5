"""One writer per folder: a run into a folder another run holds is refused with one line naming it, and changes nothing there;
a lease whose run is gone (an old heartbeat, a dead process) is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dallekit.config import CleanConfig, ExportConfig
from dallekit.pipeline.clean import clean
from dallekit.pipeline.export import export
from dallekit.pipeline.passes import LEASE, hold_folder
from tests.helpers import run_cli
from tests.stage_data import downloaded_row, shape_jpeg, write_stage
from tests.test_guard_stage import one_line


def stage(folder, name: str = "download", n: int = 8):
    rows = [downloaded_row(f"{i:016x}", f"a shape number {i} on a background", shape_jpeg(i, size=48), size=(48, 48)) for i in range(n)]
    write_stage(folder, [rows[: n // 2], rows[n // 2 :]], stage=name)
    return folder


def files(folder) -> dict:
    """Every file under a folder but the lease (whose heartbeat its holder renews), with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LEASE}


@pytest.mark.parametrize("finished", [False, True], ids=["new", "finished"])
def test_an_export_into_a_held_folder_is_refused_naming_its_owner(tmp_path, client, capsys, finished):
    src, out = stage(tmp_path / "filter", "filter"), tmp_path / "wds"
    if finished:
        export(str(src), str(out), ExportConfig(), client)
    else:
        out.mkdir()
    before = files(out)
    with hold_folder(str(out), "test"):  # a second export running into the same folder
        code, err = run_cli(capsys, *["export", src, "--out", out])
        one_line(code, err, f"{out}: another dallekit run is writing it (test, pid {os.getpid()} on {socket.gethostname()}")
        assert files(out) == before
    assert not (out / LEASE).exists()
    result = export(str(src), str(out), ExportConfig(), client)  # released: it runs
    assert result["samples"] == 8 and (out / "_SUCCESS").exists() and not (out / LEASE).exists()


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
def test_a_stage_into_a_held_folder_is_refused_with_or_without_overwrite(tmp_path, client, capsys, overwrite):
    src, out = stage(tmp_path / "download"), tmp_path / "clean"
    clean(str(src), str(out), CleanConfig(), client)
    (out / "_SUCCESS").unlink()  # as if its run were still under way
    before = files(out)
    with hold_folder(str(out), "clean"):
        code, err = run_cli(capsys, *["clean", src, "--out", out] + (["--overwrite", "--near-dup-distance", "2"] if overwrite else []))
        one_line(code, err, f"{out}: another dallekit run is writing it (clean, pid {os.getpid()}")
        assert files(out) == before  # an --overwrite removed nothing
    assert clean(str(src), str(out), CleanConfig(), client)["rows_in"] == 8


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("gone", ["old heartbeat", "dead process"])
def test_a_lease_whose_run_is_gone_is_taken_over(tmp_path, client, capsys, gone):
    src, out = stage(tmp_path / "filter", "filter"), tmp_path / "wds"
    out.mkdir()
    heartbeat, pid = (time.time() - 3600, os.getpid()) if gone == "old heartbeat" else (time.time(), dead_pid())
    (out / LEASE).write_text(json.dumps({"run": "killed", "what": "export", "host": socket.gethostname(), "pid": pid,
                                         "started": heartbeat, "heartbeat": heartbeat}))
    capsys.readouterr()
    assert export(str(src), str(out), ExportConfig(), client)["samples"] == 8
    assert f"taking over {out / LEASE} from a run that is gone (pid {pid}" in capsys.readouterr().out
    assert (out / "_SUCCESS").exists() and not (out / LEASE).exists()
