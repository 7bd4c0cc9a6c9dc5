"""The pass engine: marks vouch for their files, durable commits, shuffles, and one writer per folder."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest

from dallekit.errors import BadInputError
from dallekit.io import write_table_atomic
from dallekit.pipeline import passes
from dallekit.pipeline.passes import FolderLease, read_marks, read_shuffle_parts, run_pass, write_shuffle
from dallekit.pipeline.shards import ShardResult, ShardTask, begin_stage, run_stage
from dallekit.pipeline.stage import Stage


def write_numbers(payload, folder, log):
    """A task: one Parquet file of its numbers; each call is logged."""
    with open(log, "a") as f:
        f.write(f"{payload}\n")
    write_table_atomic(pa.table({"n": list(range(payload * 100, payload * 100 + 100))}), f"{folder}/out/{payload}.parquet")
    return {"rows": 100}


def run_numbers(folder, log):
    return run_pass(None, str(folder), "numbers", write_numbers, {str(i): i for i in range(3)}, desc="numbers",
                    folder=str(folder), log=str(log))


def calls(log) -> list[str]:
    return sorted(log.read_text().split()) if log.exists() else []


def test_a_mark_records_size_checksum_and_footer_of_each_output(tmp_path):
    run_numbers(tmp_path, tmp_path / "log")
    marks = read_marks(str(tmp_path), "numbers")
    assert sorted(marks) == ["0", "1", "2"] and marks["1"].result["rows"] == 100
    record = marks["1"].outputs["out/1.parquet"]
    assert record["bytes"] == (tmp_path / "out" / "1.parquet").stat().st_size
    assert record["checksum"].startswith("xxh3_128:") and record["tail"]


@pytest.mark.parametrize("damage", ["delete", "truncate", "replace"])
def test_a_task_whose_output_is_damaged_is_redone_despite_its_mark(tmp_path, damage):
    log = tmp_path / "log"
    run_numbers(tmp_path, log)
    log.write_text("")
    target = tmp_path / "out" / "1.parquet"
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:  # same size, other content: the footer differs
        write_table_atomic(pa.table({"n": list(range(5000, 5100))}), str(target))
    results = run_numbers(tmp_path, log)
    assert calls(log) == ["1"] and results["1"]["rows"] == 100
    assert pa.parquet.read_table(target)["n"].to_pylist()[0] == 100


def test_outputs_are_fsynced_before_the_mark_is_written(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b)))
    run_pass(None, str(tmp_path), "numbers", write_numbers, {"0": 0}, desc="numbers", folder=str(tmp_path), log=str(tmp_path / "log"))
    shard, folder = str(tmp_path / "out" / "0.parquet"), str(tmp_path / "out")
    renamed = events.index(("rename", shard))
    assert events[renamed - 1][0] == "fsync" and "_tmp-" in events[renamed - 1][1]  # the file, before its rename
    assert events[renamed + 1] == ("fsync", folder)  # its folder, after
    mark_rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith("0.json"))
    assert mark_rename > renamed + 1


def test_a_damaged_mark_is_removed_and_its_task_redone(tmp_path):
    log = tmp_path / "log"
    run_numbers(tmp_path, log)
    (tmp_path / "_progress" / "numbers" / "2.json").write_text("{not json")
    log.write_text("")
    run_numbers(tmp_path, log)
    assert calls(log) == ["2"]


def edit_mark(path, edit) -> None:
    mark = json.loads(path.read_text())
    edit(mark)
    path.write_text(json.dumps(mark))


@pytest.mark.parametrize("edit", [
    lambda m: m.update(outputs={}),
    lambda m: m["outputs"].update({"out/1.parquet": [1, 2]}),
    lambda m: m["outputs"]["out/1.parquet"].update(bytes="990"),
    lambda m: m.update(result={}),
    lambda m: m.pop("outputs"),
], ids=["no outputs", "a list", "bytes as text", "no result", "no outputs key"])
def test_a_mark_edited_by_hand_is_not_trusted_and_its_task_redone(tmp_path, edit, request):
    log = tmp_path / "log"
    run_numbers(tmp_path, log)
    if "no outputs" in request.node.name:  # the mark no longer names the shard it lost
        (tmp_path / "out" / "1.parquet").unlink()
    edit_mark(tmp_path / "_progress" / "numbers" / "1.json", edit)
    log.write_text("")
    results = run_numbers(tmp_path, log)
    assert calls(log) == ["1"] and results["1"]["rows"] == 100 and (tmp_path / "out" / "1.parquet").exists()


@pytest.mark.parametrize("name", ["../../elsewhere.bin", "absolute"])
def test_a_mark_naming_a_file_outside_its_folder_makes_dallekit_read_nothing_there(tmp_path, monkeypatch, name):
    folder, elsewhere = tmp_path / "a" / "run", tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(b"not dallekit's" * 100)
    log = folder / "log"
    folder.mkdir(parents=True)
    run_numbers(folder, log)
    name = str(elsewhere) if name == "absolute" else name
    outputs = {name: passes.vouch(str(tmp_path), [str(elsewhere)])["elsewhere.bin"]}
    forged = {"task": "1", "result": {"rows": 100}, "outputs": outputs, "seal": getattr(passes, "_seal", str)("1", {"rows": 100}, outputs)}
    (folder / "_progress" / "numbers" / "1.json").write_text(json.dumps(forged))
    opened = []
    real_open = passes.fsspec.implementations.local.LocalFileSystem._open
    monkeypatch.setattr(passes.fsspec.implementations.local.LocalFileSystem, "_open",
                        lambda self, path, *a, **k: (opened.append(str(path)), real_open(self, path, *a, **k))[1])
    log.write_text("")
    run_numbers(folder, log)
    assert calls(log) == ["1"] and not [p for p in opened if "elsewhere" in p]


def test_a_stage_mark_of_the_previous_version_resumes(tmp_path):
    shard = tmp_path / "part-00000.parquet"
    write_table_atomic(pa.table({"uid": ["a"]}), str(shard))
    legacy = {"shard": "part-00000", "rows_in": 1, "rows_out": 1, "rows_rejected": 0, "reasons": {}, "counters": {},
              "seconds": 0.1, "bytes": shard.stat().st_size, "mtime": "0", "checksum": "xxh3_128:0"}
    (tmp_path / "_progress").mkdir()
    (tmp_path / "_progress" / "part-00000.json").write_text(json.dumps(legacy))
    assert read_marks(str(tmp_path))["part-00000"].result["rows_out"] == 1
    shard.write_bytes(shard.read_bytes()[:-4])  # truncated: its footer magic is gone
    assert read_marks(str(tmp_path)) == {}


def test_a_shuffle_writes_one_file_per_producer_and_consumers_read_their_parts(tmp_path):
    table = pa.table({"x": list(range(10))})
    index = write_shuffle(table, np.array([i % 3 for i in range(10)]), str(tmp_path / "p0.arrow"))
    assert [p.name for p in tmp_path.iterdir()] == ["p0.arrow"]
    assert read_shuffle_parts([index["1"]], table.schema)["x"].to_pylist() == [1, 4, 7]
    stale = list(index["2"])
    stale[3] += 1  # the row count a producer recorded no longer matches: a replaced file
    with pytest.raises(RuntimeError, match="stale task or a replaced file"):
        read_shuffle_parts([stale], table.schema)


def test_a_held_folder_refuses_a_second_writer_naming_the_owner(tmp_path):
    with FolderLease(str(tmp_path), "clean"):
        with pytest.raises(BadInputError, match=rf"another dallekit run is writing it \(clean, pid {os.getpid()}"):
            FolderLease(str(tmp_path), "clean").acquire()
    assert not (tmp_path / passes.LEASE).exists()  # released at exit
    with FolderLease(str(tmp_path), "clean"):
        pass


@pytest.mark.parametrize("gone", ["old heartbeat", "dead pid"])
def test_a_lease_of_a_run_that_is_gone_is_taken_over(tmp_path, gone, capsys):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    held = {"run": "x", "what": "clean", "host": socket.gethostname(), "pid": os.getpid(), "started": 0, "heartbeat": time.time()}
    held |= {"heartbeat": time.time() - 2 * passes.LEASE_STALE_SECONDS} if gone == "old heartbeat" else {"pid": int(dead)}
    (tmp_path / passes.LEASE).write_text(json.dumps(held))
    with FolderLease(str(tmp_path), "filter") as lease:
        assert json.loads((tmp_path / passes.LEASE).read_text())["run"] == lease.owner["run"]
    assert "taking over" in capsys.readouterr().out


def test_the_temporary_files_of_a_run_killed_while_writing_its_json_are_removed(tmp_path):
    (tmp_path / "_stats.json.073ba9bb19c04d3aa2441f27dcf1cd5d.tmp").write_text("{")
    (tmp_path / "_tmp-0123-part-00001.parquet").write_text("")
    (tmp_path / "part-00000.parquet").write_text("")
    passes.remove_debris(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


def test_remove_debris_leaves_the_lease_its_heartbeat_thread_is_writing(tmp_path):
    (tmp_path / f"{passes.LEASE}.073ba9bb19c04d3aa2441f27dcf1cd5d.tmp").write_text("{")
    passes.remove_debris(str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("layout", [b"\xb9\x00\xff", "a folder"], ids=["binary", "a folder"])
def test_scratch_with_a_damaged_layout_file_is_redone_without_a_traceback(tmp_path, layout):
    (tmp_path / passes.WORK).mkdir()
    (tmp_path / passes.WORK / "old.bin").write_text("old")
    marker = tmp_path / passes.WORK / passes.LAYOUT
    marker.mkdir() if layout == "a folder" else marker.write_bytes(layout)
    passes.claim_work_dir(str(tmp_path))
    assert marker.read_text() == str(passes.WORK_LAYOUT) and not (tmp_path / passes.WORK / "old.bin").exists()


def test_a_heartbeat_that_cannot_be_written_is_skipped_not_a_thread_traceback(tmp_path, monkeypatch):
    import errno

    lease = FolderLease(str(tmp_path), "filter")
    assert lease._create()
    tries = []

    def full_disk(obj, path):
        tries.append(path)
        if len(tries) == 2:
            lease._stop.set()
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(passes, "LEASE_HEARTBEAT_SECONDS", 0.001)
    monkeypatch.setattr(passes, "write_json_atomic", full_disk)
    lease._beat()  # what the thread runs: it goes on beating after a failed write
    assert len(tries) == 2


def test_a_file_where_the_marks_belong_is_one_line_and_a_finished_stage_keeps_its_success(tmp_path, client):
    out = tmp_path / "out"
    begin_stage("toy", str(out), {"v": 1}, [])
    run_stage(toy_stage(), str(out), [ShardTask("part-00000", 0)], client)
    shutil.rmtree(out / "_progress")
    (out / "_progress").write_text("mine")
    with pytest.raises(BadInputError, match="out/_progress: is a file, expected the folder of dallekit's marks"):
        begin_stage("toy", str(out), {"v": 1}, [])
    assert (out / "_SUCCESS").exists() and (out / "_stats.json").exists()


def a_lease(**fields) -> str:
    import socket

    return json.dumps({"run": "x", "what": "clean", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "heartbeat": time.time()} | fields)


@pytest.mark.parametrize("lease", [
    a_lease(pid=2**70), a_lease(pid=-1), a_lease(pid=0, host="elsewhere", heartbeat=time.time() + 10**9),
    '{"run": "x", "host": "elsewhere", "pid": 5, "heartbeat": NaN}', "", "[1, 2]",
], ids=["a pid too large", "a negative pid", "a heartbeat far in the future", "a NaN heartbeat", "empty", "a list"])
def test_a_lease_no_live_run_could_have_written_is_taken_over_without_a_traceback(tmp_path, lease, capsys):
    (tmp_path / passes.LEASE).write_text(lease)
    with FolderLease(str(tmp_path), "filter") as mine:
        assert json.loads((tmp_path / passes.LEASE).read_text())["run"] == mine.owner["run"]
    assert "taking over" in capsys.readouterr().out and not (tmp_path / passes.LEASE).exists()


def test_a_live_lease_with_an_unreadable_start_time_is_refused_in_one_line(tmp_path):
    (tmp_path / passes.LEASE).write_text(a_lease(started="yesterday"))
    with pytest.raises(BadInputError, match=f"pid {os.getpid()} .*since an unknown time"):
        FolderLease(str(tmp_path), "filter").acquire()


def test_a_folder_where_the_lease_belongs_is_refused_and_kept(tmp_path):
    (tmp_path / passes.LEASE).mkdir()
    (tmp_path / passes.LEASE / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="_lease.json: is a folder, expected dallekit's lease file"):
        FolderLease(str(tmp_path), "filter").acquire()
    assert (tmp_path / passes.LEASE / "notes.txt").read_text() == "mine"


def test_a_run_whose_lease_is_taken_over_while_it_runs_marks_nothing_more_and_stops(tmp_path):
    def write_then_lose_the_lease(payload, folder):
        write_table_atomic(pa.table({"n": [payload]}), f"{folder}/out/{payload}.parquet")
        if payload == 1:  # as if this run slept past its heartbeat and another run took the folder over
            (tmp_path / passes.LEASE).write_text(a_lease(run="the other run", what="clean --overwrite"))
        return {"rows": 1}

    with FolderLease(str(tmp_path), "filter"):
        with pytest.raises(BadInputError, match=r"another run took over its lease .*\(clean --overwrite, pid"):
            run_pass(None, str(tmp_path), "numbers", write_then_lose_the_lease, {str(i): i for i in range(3)}, desc="numbers",
                     folder=str(tmp_path))
    assert sorted(read_marks(str(tmp_path), "numbers")) == ["0"]  # the task that ran after the takeover is not vouched for
    assert json.loads((tmp_path / passes.LEASE).read_text())["run"] == "the other run"  # and the new owner's lease stays


def toy_stage() -> Stage:
    def keep(payload):
        return ShardResult(rows_in=10, kept=pa.table({"uid": [f"{payload}-{i}" for i in range(10)]}))

    return Stage("toy", (), frozenset(), "toy tasks", keep)


def finished_toy_stage(out, client, shards: int) -> list[ShardTask]:
    """A finished stage of `shards` shards of 10 rows in `out`; its tasks, to run it again."""
    tasks = [ShardTask(f"part-{i:05d}", i) for i in range(shards)]
    begin_stage("toy", str(out), {"v": 1}, [])
    run_stage(toy_stage(), str(out), tasks, client)
    return tasks


def test_a_folder_in_place_of_success_is_refused_in_one_line_when_the_stage_reopens(tmp_path, client):
    out = tmp_path / "out"
    finished_toy_stage(out, client, 2)
    (out / "_SUCCESS").unlink()
    (out / "_SUCCESS").mkdir()
    (out / "part-00001.parquet").unlink()
    with pytest.raises(BadInputError, match="_SUCCESS: is a folder, expected the file dallekit writes there"):
        begin_stage("toy", str(out), {"v": 1}, [])


def test_a_finished_stage_whose_shard_was_deleted_is_reopened_not_reported_complete(tmp_path, client):
    out = tmp_path / "out"
    tasks = finished_toy_stage(out, client, 4)
    (out / "part-00002.parquet").unlink()
    assert begin_stage("toy", str(out), {"v": 1}, []) is None  # reopened: the caller runs the stage again
    assert not (out / "_SUCCESS").exists()
    stats = run_stage(toy_stage(), str(out), tasks, client)
    assert stats["rows_out"] == 40 and (out / "part-00002.parquet").exists()
    assert begin_stage("toy", str(out), {"v": 1}, [])["rows_out"] == 40  # complete again
