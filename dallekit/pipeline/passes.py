"""The one resumable-pass engine: tasks that write their outputs durably, then a mark that vouches for them; shuffles; folder leases.

Every resumable piece of work in dallekit is a *pass*: a set of tasks, each keyed by a name, run
as Dask tasks (or in the calling process). A task writes its output files atomically (a
temporary name beside the target, fsynced, renamed, the folder fsynced: `io.commit_file`), and
the engine then writes the task's *mark*. One pass's files, in the folder it was given:

    <folder>/_lease.json                   who writes this folder (owner, heartbeat); one run at a time
    <folder>/<the task's outputs>          written by the task, each committed before the mark
    <folder>/_progress/[<pass>/]<task>.json the mark: the task's JSON result and, per output file
                                           (relative to <folder>), its bytes, mtime, xxh3-128
                                           checksum and the xxh3 of its last 64 KiB (its footer)
    <folder>/_work/                        a stage's scratch passes (removed when the stage is done)

A rerun reads the marks and re-checks each vouched file cheaply, by size and footer: a task whose
output is missing, truncated or replaced is redone, and so is a task whose mark is damaged.
Only this module knows what a mark looks like on disk, and where marks and `_work/` live.

A *shuffle* moves rows from P producer tasks to C consumer tasks: each producer writes one
file (`ShuffleWriter`), an Arrow IPC stream per consumer back to back, and returns an index of
byte ranges; each consumer reads its parts by byte range (`read_shuffle_parts`). A pass thus
writes P files, not P x C.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from dallekit.errors import BadInputError, environment_error
from dallekit.io import collect_written, commit_file, file_checksum, naming_file, write_json_atomic
from dallekit.progress import progress

WORK = "_work"  # a stage's scratch folder inside its output
PROGRESS = "_progress"  # the marks of a folder's passes
LEASE = "_lease.json"  # the one writer of a folder
LAYOUT = "_layout"  # in _work/: the version of the scratch layout (2: this engine's marks and shuffles)
WORK_LAYOUT = 2
CONSUMED = "_consumed"  # in a pass's marks folder: its outputs were read by later passes and removed
TAIL_BYTES = 1 << 16  # the footer a resume re-reads: a Parquet footer, a tar's end blocks, an IPC stream's end
LEASE_HEARTBEAT_SECONDS = 10.0  # how often a run renews its lease
LEASE_STALE_SECONDS = 120.0  # a lease not renewed for this long belongs to a run that died: it is taken over


def work_dir(output_dir: str) -> str:
    """A stage's scratch folder inside its output, removed once the stage is complete."""
    return f"{output_dir.rstrip('/')}/{WORK}"


def claim_work_dir(output_dir: str) -> str:
    """A stage's scratch folder, ready for its passes; scratch written by an earlier dallekit version is removed (redone, never mixed)."""
    fs, root = fsspec.core.url_to_fs(work_dir(output_dir))
    layout = f"{root}/{LAYOUT}"
    if fs.exists(root) and not (fs.isfile(layout) and fs.cat_file(layout).strip() == str(WORK_LAYOUT).encode()):
        print(f"{output_dir}: its {WORK}/ was left by an earlier dallekit version; redoing that work")
        fs.rm(root, recursive=True)
    if not fs.exists(layout):
        fs.makedirs(root, exist_ok=True)
        with fs.open(layout, "w") as f:
            f.write(str(WORK_LAYOUT))
    return work_dir(output_dir)


def remove_work_dir(output_dir: str) -> None:
    """Delete a finished stage's scratch folder."""
    fs, root = fsspec.core.url_to_fs(work_dir(output_dir))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _marks_dir(folder: str, pass_name: str | None) -> str:
    """Where the marks of one pass over `folder` live."""
    return f"{folder.rstrip('/')}/{PROGRESS}" + (f"/{pass_name}" if pass_name else "")


# ---------------------------------------------------------------- what a mark vouches for


def _tail_checksum(fs: Any, path: str, size: int) -> str:
    """The xxh3-64 of a file's last TAIL_BYTES bytes: its footer, cheap to re-read."""
    import xxhash

    with fs.open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return xxhash.xxh3_64_hexdigest(f.read(TAIL_BYTES))


def _modified(info: dict) -> str | None:
    """A file's modification time from fsspec's info (local mtime, an object store's LastModified), as a string."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return str(value) if value is not None else None


def vouch(folder: str, paths: list[str]) -> dict[str, dict]:
    """What a mark records of each output file: {path relative to folder: {bytes, mtime, checksum, tail}}."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    found = {}
    for path in paths:
        p = fsspec.core.url_to_fs(path)[1]
        info = fs.info(p)
        relative = p[len(root) + 1:] if p.startswith(root + "/") else p
        found[relative] = {"bytes": info["size"], "mtime": _modified(info), "checksum": file_checksum(path),
                           "tail": _tail_checksum(fs, p, info["size"])}
    return found


def _scope(root: str) -> str:
    """Where a pass over `root` may name files by absolute path: its folder's parent (dedup's state vouches for `dups/` beside it)."""
    return root.rsplit("/", 1)[0] if root.count("/") > 1 else root


def _inside(root: str, name: Any) -> bool:
    """Whether a file a mark names stays in its pass's scope, without `..`: a mark never makes dallekit read or delete elsewhere."""
    if not isinstance(name, str) or not name or "\\" in name or ".." in name.split("/"):
        return False
    scope = _scope(root)
    return not name.startswith("/") or name.startswith(f"{scope}/")


def _file_whole(fs: Any, root: str, relative: str, record: dict) -> bool:
    """Whether a vouched file is there with its recorded size and footer."""
    path = relative if relative.startswith("/") else f"{root}/{relative}"
    try:
        size = fs.size(path)
    except (FileNotFoundError, OSError):
        return False
    if size != record.get("bytes"):
        return False
    if "tail" in record:
        return _tail_checksum(fs, path, size) == record["tail"]
    with fs.open(path, "rb") as f:  # a mark from before the footer was recorded: a Parquet shard ends with its magic
        f.seek(max(0, size - 4))
        return f.read(4) == b"PAR1"


@dataclass
class Mark:
    """A finished task: its JSON result and the files it vouches for."""

    task: str
    result: dict
    outputs: dict[str, dict]


def _seal(task: str, result: dict, outputs: dict) -> str:
    """The xxh3 of a mark's content: a mark edited by hand (or half-written by a foreign tool) no longer matches it."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(json.dumps([task, result, outputs], sort_keys=True).encode())


def _valid_outputs(root: str, outputs: Any) -> bool:
    """Whether a mark's outputs are {path inside the pass's scope: {bytes: int, ...}}."""
    return isinstance(outputs, dict) and all(
        _inside(root, rel) and isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and not isinstance(rec["bytes"], bool)
        and isinstance(rec.get("tail", ""), str) for rel, rec in outputs.items())


def _parse_mark(data: Any, task: str, root: str) -> Mark | None:
    """A mark read from disk, or None when it is damaged or edited; a stage shard's mark from before the engine is read too."""
    if not isinstance(data, dict):
        return None
    if data.get("task") == task and isinstance(data.get("result"), dict) and _valid_outputs(root, data.get("outputs")):
        if data.get("seal") != _seal(task, data["result"], data["outputs"]):
            return None
        return Mark(task, data["result"], data["outputs"])
    legacy_keys = {"shard", "rows_in", "rows_out", "rows_rejected", "reasons", "counters", "bytes"}
    if legacy_keys <= set(data) and data["shard"] == task:  # dallekit <= 0.29 stage marks: the shard's bytes and checksum inline
        record = {k: data[k] for k in ("bytes", "mtime", "checksum") if k in data}
        result = {k: v for k, v in data.items() if k not in ("bytes", "mtime", "checksum")}
        outputs = {f"{task}.parquet": record}
        return Mark(task, result, outputs) if _valid_outputs(root, outputs) else None
    return None


def read_marks(folder: str, pass_name: str | None = None, verify: bool = True, remove_damaged: bool = True) -> dict[str, Mark]:
    """The marks of a pass's finished tasks; with `verify`, only those whose files are whole (the others are removed, so redone)."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    marks_dir = fsspec.core.url_to_fs(_marks_dir(folder, pass_name))[1]
    if fs.isfile(marks_dir):
        raise BadInputError(f"{marks_dir}: is a file, expected the folder of dallekit's marks; move it away, then rerun")
    found = {}
    consumed = fs.exists(f"{marks_dir}/{CONSUMED}")  # later passes read its outputs and they were removed: nothing to re-check
    for path in sorted(fs.glob(f"{marks_dir}/*.json")):
        task = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            with fs.open(path, "r") as f:
                mark = _parse_mark(json.load(f), task, root)
        except ValueError:
            mark = None
        if mark is not None and verify and not consumed and not all(_file_whole(fs, root, rel, rec) for rel, rec in mark.outputs.items()):
            mark = None
        if mark is None:
            if remove_damaged:
                fs.rm(path)
            continue
        found[task] = mark
    return found


def write_mark(folder: str, task: str, result: dict, outputs: list[str], pass_name: str | None = None) -> dict:
    """Record that `task` is complete, vouching for its output files (already committed); returns the result as a rerun reads it."""
    result = json.loads(json.dumps(result, default=str))
    vouched = vouch(folder, sorted(set(outputs)))
    mark = {"task": task, "result": result, "outputs": vouched, "seal": _seal(task, result, vouched)}
    with collect_written():  # a mark written inside another task (retry rewrites download's) is not that task's output
        write_json_atomic(mark, f"{_marks_dir(folder, pass_name)}/{task}.json")
    return result


def recorded_checksum(folder: str, task: str, relative: str, info: dict) -> str | None:
    """The checksum a mark recorded for a file, when the file still has the size and time it recorded; else None."""
    fs, root = fsspec.core.url_to_fs(folder)
    path = fsspec.core.url_to_fs(f"{_marks_dir(folder, None)}/{task}.json")[1]
    try:
        with fs.open(path, "r") as f:
            mark = _parse_mark(json.load(f), task, root.rstrip("/"))
    except (ValueError, OSError):
        return None
    record = mark.outputs.get(relative) if mark else None
    if not record or (record.get("bytes"), record.get("mtime")) != (info["size"], _modified(info)):
        return None
    return record.get("checksum")


def remove_debris(folder: str) -> None:
    """Delete the temporary files an interrupted run left in a folder, its rejects and its marks."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    for pattern in ("_tmp-*", "_rejects/_tmp-*", "*.json.*.tmp", f"{PROGRESS}/*.tmp", f"{PROGRESS}/*/*.tmp"):  # io's writers' names
        for p in fs.glob(f"{root}/{pattern}"):
            if not p.rsplit("/", 1)[-1].startswith(LEASE):  # the heartbeat thread's file, being written now
                fs.rm(p)


def drop_outputs(folder: str, pass_name: str, *data: str) -> None:
    """Delete the data folders (relative to `folder`) of a pass that no later pass reads; its marks stay and are no longer re-checked."""
    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    marks_dir = fsspec.core.url_to_fs(_marks_dir(folder, pass_name))[1]
    fs.makedirs(marks_dir, exist_ok=True)
    with fs.open(f"{marks_dir}/{CONSUMED}", "wb"):
        pass
    for name in data:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


def clear_marks(folder: str, pass_name: str | None = None) -> None:
    """Forget a pass's marks (its files stay): the next run redoes every task."""
    fs, path = fsspec.core.url_to_fs(_marks_dir(folder, pass_name))
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- running a pass


@dataclass
class _Refused:
    """A task's bad input, returned rather than raised so that Dask neither retries it nor logs a traceback."""

    message: str


def _guarded(fn: Callable, item: Any, desc: str = "", **kwargs: Any) -> Any:
    """Run one task; bad input and environment errors (a full disk, naming its file) come back as a _Refused value."""
    try:
        return fn(item, **kwargs)
    except BadInputError as err:
        return _Refused(str(err))
    except OSError as err:
        converted = environment_error(err, desc or fn.__name__)
        if converted is None:
            raise
        return _Refused(str(converted))


def map_with_progress(
    client: Any, fn: Callable, items: list, desc: str, unit: str = "task", already_done: int = 0, retries: int = 2, **kwargs: Any
) -> list:
    """Run fn(item, **kwargs) as one Dask task per item with a progress bar; results in item order.

    A task's BadInputError (or full disk) stops the run with that one-line error, without retries.
    """
    if not items:
        return []
    from distributed import as_completed

    keys = [f"{desc}-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(items))]
    futures = client.map(functools.partial(_guarded, fn, desc=desc), items, key=keys, retries=retries, pure=False, **kwargs)
    with progress(total=len(items) + already_done, initial=already_done, desc=desc, unit=unit) as bar:
        try:
            for future in as_completed(futures):
                result = future.result()  # re-raises a bug's error after its retries
                if isinstance(result, _Refused):
                    raise BadInputError(result.message)
                bar.update(1)
        except BaseException:
            client.cancel(futures)
            raise
    return [f.result() for f in futures]


def _run_marked(item: tuple[str, str | None, str, Any, tuple | None], task_fn: Callable, **kwargs: Any) -> dict:
    """Run one task, collecting the files it commits, then write its mark: the outputs are complete once the mark exists.

    With the run's lease (its file and run id), the mark is written only while the lease is still
    this run's: a run whose lease was taken over marks nothing that the new owner would trust.
    """
    folder, pass_name, task, payload, lease = item
    start = time.perf_counter()
    with collect_written() as written:
        result = task_fn(payload, **kwargs)
    result = dict(result) | {"task_seconds": round(time.perf_counter() - start, 3)}
    if lease is not None:
        _check_lease_ours(*lease)
    return write_mark(folder, task, result, written, pass_name)


def run_pass(client: Any, folder: str, pass_name: str | None, fn: Callable[..., dict], items: dict[str, Any], /,
             desc: str, unit: str = "task", retries: int = 2, **kwargs: Any) -> dict[str, dict]:
    """fn(payload, **kwargs) -> JSON-able dict for every item whose mark is missing or whose files are not whole; every result.

    Files the task writes through `io`'s atomic writers are vouched for by its mark (the first five
    arguments are positional-only, so a task's keyword arguments may reuse their names). With
    `client` None the tasks run here, in order (inside one Dask task of a small run).
    """
    lease = held_lease(folder)
    done = {key: mark.result for key, mark in read_marks(folder, pass_name).items() if key in items}
    pending = [key for key in items if key not in done]
    if done and pending and client is not None:  # the driver of a rerun says what it keeps (not each pass of a one-task run)
        print(f"{desc}: resuming, {len(done)} of {len(items)} {unit}s already complete")
    payloads = [(folder, pass_name, key, items[key], lease) for key in pending]
    if client is None:
        out = [_run_marked(p, task_fn=fn, **kwargs) for p in payloads]
    else:
        out = map_with_progress(client, _run_marked, payloads, desc=desc, unit=unit, already_done=len(done), retries=retries,
                                task_fn=fn, **kwargs)
    done.update(zip(pending, out))
    if lease is not None:
        _check_lease_ours(*lease)
    return {key: done[key] for key in items}


# ---------------------------------------------------------------- shuffles


class ShuffleWriter:
    """One producer's output of one kind: an Arrow IPC stream per consumer, back to back in one file committed atomically.

    One file per producer (not per producer and consumer) keeps the files of a pass linear in
    the dataset: P producers and C consumers write P files, read by byte range, not P * C.
    """

    def __init__(self, path: str) -> None:
        self.path, self.index = path, {}
        self.fs, p = fsspec.core.url_to_fs(path)
        parent, name = p.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        self.local, self.tmp = p, f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"
        self.file = self.fs.open(self.tmp, "wb")

    def add(self, consumer: Any, table: pa.Table) -> None:
        """The rows of one consumer."""
        start = self.file.tell()
        with pa.ipc.new_stream(self.file, table.schema) as writer:
            writer.write_table(table)
        self.index[str(consumer)] = [self.path, start, self.file.tell() - start, table.num_rows]

    def split(self, table: pa.Table, consumer_of_row: np.ndarray, key: Callable[[int], Any] = int,
              take: Callable[[pa.Table, np.ndarray], pa.Table] | None = None) -> None:
        """The rows of `table` with each value v of `consumer_of_row`, for consumer key(v); `take` picks rows (default Arrow's)."""
        if not table.num_rows:
            return
        if np.all(consumer_of_row == consumer_of_row[0]):  # one consumer: no reordering
            self.add(key(int(consumer_of_row[0])), table)
            return
        take = take or (lambda t, rows: t.take(pa.array(rows)))
        order = np.argsort(consumer_of_row, kind="stable")
        values, starts = np.unique(consumer_of_row[order], return_index=True)
        for value, lo, hi in zip(values.tolist(), starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
            self.add(key(int(value)), take(table, order[lo:hi]))

    def close(self) -> dict[str, list]:
        """Commit the file (none when no rows); the index {consumer: [path, offset, length, rows]}."""
        self.file.close()
        if self.index:  # commit_file fsyncs a local file before its rename (an object store's file has no descriptor)
            commit_file(self.fs, self.tmp, self.path)
        else:
            self.fs.rm(self.tmp)
        return self.index


def write_shuffle(table: pa.Table, consumer_of_row: np.ndarray, path: str, **split: Any) -> dict[str, list]:
    """The rows of `table` for each consumer in one file at `path`; its index (empty for no rows)."""
    out = ShuffleWriter(path)
    out.split(table, consumer_of_row, **split)
    return out.close()


def parts_for_consumers(results: Any, kind: str) -> dict[str, list[list]]:
    """The parts of `kind` each consumer must read, from its producers' results (each with `parts`: {kind: index}), in producer order."""
    refs: dict[str, list[list]] = {}
    for result in results:
        for consumer, ref in result["parts"].get(kind, {}).items():
            refs.setdefault(consumer, []).append(ref)
    return refs


def read_shuffle_parts(refs: list[list], schema: pa.Schema) -> pa.Table:
    """The parts `refs` ([path, offset, length, rows] each) as one table; empty with `schema` when none.

    Each part is read by its byte range, and must hold the rows its producer counted: a task
    that a killed driver left running then fails rather than read a file a rerun replaced.
    """
    tables = []
    for path, offset, length, rows in refs:
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as f:
            f.seek(offset)
            table = pa.ipc.open_stream(pa.py_buffer(f.read(length))).read_all()
        if table.num_rows != rows:
            raise RuntimeError(f"{path}@{offset}: {table.num_rows} rows where {rows} were written (a stale task or a replaced file)")
        tables.append(table)
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


# ---------------------------------------------------------------- one writer per folder


def _pid_alive(pid: int) -> bool:
    """Whether a process of this host is running (0 and negative numbers name groups, not a process: never alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


_HELD: dict[str, FolderLease] = {}  # the leases this process holds, by folder path


def held_lease(folder: str) -> tuple[str, str, str] | None:
    """(lease file, run id, folder) of this process's lease over `folder` or a folder above it; None when it holds none."""
    root = fsspec.core.url_to_fs(folder)[1].rstrip("/")
    for held_root, lease in _HELD.items():
        if root == held_root or root.startswith(held_root + "/"):
            return lease.path, lease.owner["run"], lease.folder
    return None


def _check_lease_ours(path: str, run: str, folder: str) -> None:
    """Bad input when the lease at `path` is no longer run `run`'s: another run took the folder over, so this one stops writing."""
    fs = fsspec.core.url_to_fs(folder)[0]
    try:
        with fs.open(path, "r") as f:
            held = json.load(f)
    except (ValueError, OSError):
        held = None
    if not isinstance(held, dict) or held.get("run") != run:
        who = f" ({held.get('what')}, pid {held.get('pid')} on {held.get('host')})" if isinstance(held, dict) else ""
        raise BadInputError(f"{folder}: another run took over its lease {path}{who} while this one ran; "
                            "stopped so the two do not mix: rerun once that one has ended")


def check_held(folder: str) -> None:
    """Bad input when this process's lease over `folder` was taken over by another run (no-op when it holds none)."""
    lease = held_lease(folder)
    if lease is not None:
        _check_lease_ours(*lease)


class FolderLease:
    """A run's claim on its output folder: `_lease.json` with owner and heartbeat, renewed by a thread, removed on release.

    A second run into a held folder (an --overwrite included) is refused with one line naming
    the owner. A lease whose heartbeat is older than LEASE_STALE_SECONDS, or whose owner on this
    host has exited, belongs to a run that died: it is taken over.
    """

    def __init__(self, folder: str, what: str) -> None:
        self.folder, self.what = folder, what
        self.fs, root = fsspec.core.url_to_fs(folder)
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.owner = {"run": uuid.uuid4().hex, "what": what, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as f:
                held = json.load(f)
            return held if isinstance(held, dict) else {}
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # damaged: treated as stale below

    def _stale(self, held: dict) -> bool:
        heartbeat = held.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or not abs(time.time() - heartbeat) <= LEASE_STALE_SECONDS:
            return True  # no heartbeat, an old one, or one no clock could have written (NaN, far in the future)
        return held.get("host") == self.owner["host"] and isinstance(held.get("pid"), int) and not _pid_alive(held["pid"])

    def _create(self) -> bool:
        """Write the lease only if no file is there (O_EXCL locally); False when another run got there first."""
        data = json.dumps(self.owner | {"heartbeat": time.time()}).encode()
        try:
            with naming_file(self.path), self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def acquire(self) -> FolderLease:
        """Take the lease, or bad input naming the run that holds it."""
        if self.fs.isdir(self.path):  # never removed as a stale lease: it is not dallekit's
            raise BadInputError(f"{self.path}: is a folder, expected dallekit's lease file; move it away, then rerun")
        for _ in range(3):
            if self._create():
                break
            held = self._read()
            if held is None:
                continue
            if not self._stale(held):
                try:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started")))
                except (TypeError, ValueError, OverflowError, OSError):
                    since = "an unknown time"
                raise BadInputError(f"{self.folder}: another dallekit run is writing it ({held.get('what')}, pid {held.get('pid')} "
                                    f"on {held.get('host')}, since {since}); wait for it to end or stop it, then rerun")
            print(f"{self.what}: taking over {self.path} from a run that is gone (pid {held.get('pid')} on {held.get('host')})")
            self.fs.rm(self.path)
        else:
            raise BadInputError(f"{self.folder}: could not take its lease {self.path}; another run keeps claiming it")
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.folder}", daemon=True)
        self._thread.start()
        _HELD[fsspec.core.url_to_fs(self.folder)[1].rstrip("/")] = self
        return self

    def _beat(self) -> None:
        """Renew the heartbeat until released; stop renewing if another run took the lease over."""
        while not self._stop.wait(LEASE_HEARTBEAT_SECONDS):
            held = self._read()
            if not held or held.get("run") != self.owner["run"]:
                return
            try:
                write_json_atomic(self.owner | {"heartbeat": time.time()}, self.path)
            except OSError:  # a full disk or a passing error: the next beat tries again; the run itself reports the disk
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        _HELD.pop(fsspec.core.url_to_fs(self.folder)[1].rstrip("/"), None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("run") == self.owner["run"]:
            self.fs.rm(self.path)

    def __enter__(self) -> FolderLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_folder(folder: str, what: str) -> FolderLease:
    """The lease on `folder` for one run of `what` (a stage's name), as a context manager; the folder must exist."""
    return FolderLease(folder, what)
