"""Stage folders on the pass engine: fingerprints, folder checks, shard marks, per-shard stats, _SUCCESS, resume.

`run_plan` hands `run_stage` a list of `ShardTask`s and the stage, whose function turns one
task's payload into a `ShardResult` (kept rows, rejected rows with a `reason`, counters). Each
shard is one task of a pass (`pipeline/passes.py`) over the stage folder: it commits its kept
rows (`part-NNNNN.parquet`) and its rejects (`_rejects/part-NNNNN.parquet`, only when there are
some), then the engine writes its mark (its counts, vouching for both files). A rerun redoes
the shards without a mark or whose files are not whole, so an interrupted stage ends with
every uid exactly once; a finished stage whose shards were deleted or truncated is reopened.
`_stats.json` sums the marks and `_SUCCESS` closes the stage. Folders starting with `_` are
ignored by pyarrow and Dask when they read the stage folder.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from dallekit.errors import BadInputError, environment_error
from dallekit.io import commit_file, file_checksum, list_shards, shard_stem, write_json_atomic, write_table_atomic, write_tables_atomic
from dallekit.pipeline.passes import LEASE, check_held, read_marks, recorded_checksum, remove_debris, run_pass

FINGERPRINT = "_fingerprint.json"


@dataclass
class ShardTask:
    """One unit of work: the output shard's name and what the stage needs to compute it."""

    name: str  # "part-00042"
    payload: Any


@dataclass
class ShardResult:
    """What a stage's shard function returns: kept rows, rejected rows and counters."""

    rows_in: int
    # the kept rows, or their batches in order (written as they come, so the task holds one batch; the stage may
    # fill in rejects and counters while it yields them: they are read after the last batch)
    kept: pa.Table | Iterable[pa.Table]
    rejects: pa.Table | None = None  # must carry a `reason` column
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # e.g. {"status": {"success": 9}}


def shard_name(index: int) -> str:
    """The file stem of shard `index`."""
    return f"part-{index:05d}"


def _run_shard(task: ShardTask, output_dir: str, process: Callable[[Any], ShardResult], parquet_kwargs: dict) -> dict:
    """Compute one shard on a worker and commit it: kept rows, then rejects; the engine then writes its mark."""
    start = time.time()
    result = process(task.payload)
    root = output_dir.rstrip("/")
    shard_path = f"{root}/{task.name}.parquet"
    kept = [result.kept] if isinstance(result.kept, pa.Table) else result.kept
    n_kept = write_tables_atomic(kept, shard_path, **parquet_kwargs)
    n_rejected = result.rejects.num_rows if result.rejects is not None else 0
    if result.rows_in != n_kept + n_rejected:  # a bug in the stage, never bad input; without a mark, a rerun redoes the shard
        raise RuntimeError(f"{task.name}: {result.rows_in} rows in but {n_kept} kept + {n_rejected} rejected")
    reject_path = f"{root}/_rejects/{task.name}.parquet"
    reasons: dict[str, int] = {}
    if n_rejected:
        write_table_atomic(result.rejects, reject_path)
        reasons = dict(collections.Counter(result.rejects.column("reason").to_pylist()))
    else:
        fs, p = fsspec.core.url_to_fs(reject_path)
        if fs.exists(p):  # left by an earlier, different attempt at this shard
            fs.rm(p)
    return {
        "shard": task.name,
        "rows_in": result.rows_in,
        "rows_out": n_kept,
        "rows_rejected": n_rejected,
        "reasons": reasons,
        "counters": result.counters,
        "seconds": round(time.time() - start, 3),
    }


def read_shard_marks(output_dir: str, verify: bool = False) -> dict[str, dict]:
    """The results of a stage folder's finished shards (rows, reasons, counters), by shard name; `verify` re-checks their files."""
    return {name: mark.result for name, mark in read_marks(output_dir, verify=verify, remove_damaged=False).items()}


def damaged_shards(output_dir: str, names: Iterable[str]) -> list[str]:
    """The shards among `names` whose mark is missing or whose files are not whole (a deleted, truncated or replaced shard)."""
    whole = read_marks(output_dir, verify=True, remove_damaged=False)
    return [name for name in names if name not in whole]


def exists(path: str) -> bool:
    """Whether a local path or fsspec URL exists."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def stage_complete(output_dir: str) -> bool:
    """True when a stage folder holds a finished stage (_SUCCESS written)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    return fs.exists(f"{root.rstrip('/')}/_SUCCESS")


def read_stats(output_dir: str) -> dict:
    """The `_stats.json` of a finished stage; bad input naming it if it is not a stage's stats."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    path = f"{root.rstrip('/')}/_stats.json"
    try:
        with fs.open(path, "r") as f:
            stats = json.load(f)
    except (ValueError, IsADirectoryError) as err:
        raise BadInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("stage"), str):
        raise BadInputError(f"{path}: not a stage's stats (expected a JSON object with a stage name)")
    return stats


def _local_real(path: str) -> str | None:
    """The resolved path of a local folder, or None for a remote URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    return os.path.realpath(path.removeprefix("file://"))


def _check_not_input(output_dir: str, input_dirs: list[str]) -> None:
    """--out must not be an input, lie inside one, or hold one: a stage would overwrite or list what it reads."""
    out = _local_real(output_dir)
    for input_dir in input_dirs:
        src = _local_real(input_dir)
        if out is None or src is None:
            if output_dir.rstrip("/") == input_dir.rstrip("/"):
                raise BadInputError(f"--out {output_dir}: is the input folder; give another folder")
            continue
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            relation = "is" if out == src else ("is inside" if out.startswith(src + os.sep) else "holds")
            raise BadInputError(f"--out {output_dir}: {relation} the input {input_dir}; give a folder of its own")


def input_identity(input_dir: str, upstream: tuple[str, ...], required: bool = True) -> dict:
    """What a stage's fingerprint records of a stage folder it reads: its stage, fingerprint digest and shards by content.

    The folder must hold a finished stage of one of the `upstream` kinds (its `_SUCCESS` and
    `_stats.json`); bad input otherwise. With `required=False` a folder of hand-made shards is
    accepted too. Each shard is recorded by name, size and xxh3-128 checksum (from its progress mark while
    size and time match, else read), so a moved folder is the same input and an edited one
    is not; `path` says where it was read and is not compared (see `fingerprint_content`).
    """
    fs, root = fsspec.core.url_to_fs(input_dir)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise BadInputError(f"{input_dir}: no such folder")
    kinds = " or ".join(f"`dallekit {u}`" for u in upstream)
    if not required and not fs.exists(f"{root}/_SUCCESS"):
        return {"path": _local_real(input_dir) or input_dir, "stage": None, "shards": shard_identities(input_dir)}
    if not fs.exists(f"{root}/_SUCCESS") or not fs.exists(f"{root}/_stats.json"):
        raise BadInputError(f"{input_dir}: not a finished stage folder (no _SUCCESS); expected the output of {kinds}")
    try:
        stats = read_stats(input_dir)
    except (ValueError, OSError) as err:
        raise BadInputError(f"{input_dir}/_stats.json: not readable ({err})") from None
    stage = stats.get("stage")
    if stage not in upstream:
        raise BadInputError(f"{input_dir}: holds a `{stage}` stage; expected the output of {kinds}")
    digest = None
    if fs.exists(f"{root}/{FINGERPRINT}"):
        stored = _read_fingerprint(fs, root, input_dir, advice=f"rerun the `{stage}` stage that wrote this input folder")
        digest = hashlib.sha256(json.dumps(fingerprint_content(stored), sort_keys=True).encode()).hexdigest()[:16]
    identity = {"path": _local_real(input_dir) or input_dir, "stage": stage, "fingerprint": digest,
                "shards": shard_identities(input_dir)}
    rounds = (stats.get("retry") or {}).get("rounds")
    return identity | ({"retry_rounds": rounds} if rounds else {})  # `download --retry-failed` changed its rows


def shard_identities(input_dir: str) -> list[list]:
    """[name, bytes, checksum] of each shard of a folder: the mark's checksum while the file keeps its size and time, else the file's.

    A copy that changes the time is hashed again (and is the same input); an edit of the same
    size changes the time, so it is hashed again and is another input.
    """
    fs, _ = fsspec.core.url_to_fs(input_dir)
    found = []
    for path in list_shards(input_dir):
        info = fs.info(fsspec.core.url_to_fs(path)[1])
        name = shard_stem(path)
        recorded = recorded_checksum(input_dir, name, f"{name}.parquet", info)
        found.append([name, info["size"], recorded or file_checksum(path)])
    return found


LOCATION_KEYS = frozenset({"path"})  # where an input was read: recorded in a fingerprint, never compared


def fingerprint_content(fingerprint: Any) -> Any:
    """A fingerprint without its location keys, so that a moved run folder (or input) is the same run."""
    if isinstance(fingerprint, dict):
        return {k: fingerprint_content(v) for k, v in fingerprint.items() if k not in LOCATION_KEYS}
    if isinstance(fingerprint, list):
        return [fingerprint_content(v) for v in fingerprint]
    return fingerprint


def path_digest(path: str) -> str | None:
    """A short sha256 of a local file, or of a folder's files (names and contents); None if it does not exist."""
    target = os.path.realpath(path)
    files = [target] if os.path.isfile(target) else sorted(
        os.path.join(d, name) for d, _, names in os.walk(target) for name in names
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.relpath(name, target).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    """The JSON round trip of a fingerprint, so a fresh one compares equal to a stored one."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two fingerprints, as 'name old -> new'."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}")
    return found


def _read_fingerprint(fs: Any, root: str, output_dir: str, advice: str = "remove the folder or pass --overwrite") -> dict | None:
    path = f"{root}/{FINGERPRINT}"
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            stored = json.load(f)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise BadInputError(f"{output_dir}/{FINGERPRINT}: not a stage fingerprint; {advice}")
    return stored


def read_fingerprint(folder: str) -> dict | None:
    """A stage folder's recorded fingerprint (None when it has none); bad input when it is not one."""
    fs, root = fsspec.core.url_to_fs(folder)
    return _read_fingerprint(fs, root.rstrip("/"), folder, advice="rerun the stage that wrote this folder")


def _prepare_folder(fs: Any, root: str, output_dir: str) -> None:
    """Create --out, or bad input when it is a file, lies under a file, or cannot be written."""
    if fs.exists(root) and not fs.isdir(root):
        raise BadInputError(f"--out {output_dir}: is a file, expected a folder")
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as err:
        raise environment_error(err, f"--out {output_dir}") or BadInputError(f"--out {output_dir}: cannot create it ({err})") from None


def check_output_folder(output_dir: str, input_dirs: list[str]) -> None:
    """--out is none of the inputs and is (now) a folder: checked before its lease is taken."""
    _check_not_input(output_dir, input_dirs)
    fs, root = fsspec.core.url_to_fs(output_dir)
    _prepare_folder(fs, root.rstrip("/"), output_dir)


def prepare_output(output_dir: str, input_dirs: list[str]) -> None:
    """For the trainers and tools: --out is not an input nor a stage folder, is or can be a folder, and can be written."""
    _check_not_input(output_dir, input_dirs)
    fs, root = fsspec.core.url_to_fs(output_dir)
    for marker in (FINGERPRINT, "_stats.json", "_SUCCESS"):
        if fs.exists(f"{root.rstrip('/')}/{marker}"):
            raise BadInputError(f"--out {output_dir}: holds a dallekit stage ({marker}); give a folder of its own")
    _prepare_folder(fs, root.rstrip("/"), output_dir)
    probe = f"{root.rstrip('/')}/.dallekit-write-test-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except OSError as err:
        raise environment_error(err, f"--out {output_dir}") or BadInputError(f"--out {output_dir}: cannot write there ({err})") from None


def begin_stage(stage: str, output_dir: str, fingerprint: dict, input_dirs: list[str], overwrite: bool = False) -> dict | None:
    """Claim --out for a stage run before any work: the stats of an identical finished run, or None to go on.

    `fingerprint` holds what the output depends on (the inputs and the options that change it).
    A folder holding this stage with the same fingerprint resumes (or is already complete); one
    with another fingerprint is refused, naming what differs, unless `overwrite` starts afresh.
    A folder holding another stage, anything else, or one of the inputs is refused.
    """
    _check_not_input(output_dir, input_dirs)
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    _prepare_folder(fs, root, output_dir)
    current = _canonical({"stage": stage, **fingerprint})
    stored = _read_fingerprint(fs, root, output_dir)
    entries = [p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] not in (FINGERPRINT, LEASE)]
    other = stored.get("stage") if stored else (read_stats(output_dir).get("stage") if fs.exists(f"{root}/_stats.json") else None)
    if other is not None and other != stage:
        raise BadInputError(f"--out {output_dir}: holds a `{other}` stage, not {stage}; give another folder")
    if stored is None and entries and not (other == stage and overwrite):
        what = f"a `{other}` stage with no fingerprint (pass --overwrite)" if other else "files that are not a dallekit stage"
        raise BadInputError(f"--out {output_dir}: holds {what}; give an empty or new folder")
    changed = stored is not None and fingerprint_content(stored) != fingerprint_content(current)
    if changed:
        if not overwrite:
            differences = _differences(fingerprint_content(stored), fingerprint_content(current))
            changes = "; ".join(differences[:6])
            if all(d.startswith("versions.") for d in differences):
                raise BadInputError(f"--out {output_dir}: holds a `{stage}` run made with other package versions ({changes}); "
                                    "install those versions to resume it, or pass --overwrite to redo it with these")
            raise BadInputError(f"--out {output_dir}: holds a `{stage}` run with other inputs or options ({changes}); "
                                "rerun with the same ones to resume, or pass --overwrite to start afresh")
    if changed or (stored is None and entries):
        print(f"{stage}: --overwrite: removing the earlier run in {output_dir}")
        for p in entries:  # the lease stays: this run holds it
            fs.rm(p, recursive=True)
    elif stored is not None and fs.exists(f"{root}/_SUCCESS"):
        if _complete_shards_whole(output_dir, stage):
            print(f"{stage}: {output_dir} is already complete with these inputs and options")
            if stored != current:  # moved: record where its inputs are now
                write_json_atomic(current, f"{root}/{FINGERPRINT}")
            return read_stats(output_dir)
    try:
        write_json_atomic(current, f"{root}/{FINGERPRINT}")
    except OSError as err:
        raise environment_error(err, f"--out {output_dir}") or err from None
    return None


def _complete_shards_whole(output_dir: str, stage: str) -> bool:
    """Whether every shard a finished stage's marks vouch for is whole; if not, the stage is reopened (its _SUCCESS removed)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    expected = read_stats(output_dir).get("shards")
    whole = read_marks(output_dir, verify=True, remove_damaged=True)
    if len(whole) == expected:
        return True
    print(f"{stage}: {output_dir} was complete but {expected - len(whole) if isinstance(expected, int) else 'some'} "
          "of its shards are missing, truncated or replaced; redoing them")
    for name in ("_SUCCESS", "_stats.json"):
        if fs.isdir(f"{root}/{name}"):
            raise BadInputError(f"{root}/{name}: is a folder, expected the file dallekit writes there; move it away, then rerun")
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    return False


def run_stage(stage: Any, output_dir: str, tasks: Iterable[ShardTask], client: Any, config: dict | None = None,
              retries: int = 2, started: float | None = None) -> dict:
    """Run `stage.process` on every task not yet complete, one Dask task per shard, then write _stats.json and _SUCCESS.

    `stage` is a `pipeline.stage.Stage` (its name, process and parquet_kwargs); `begin_stage` has
    already claimed the folder, so a complete one never gets here.
    """
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    start = started or time.time()  # a stage with earlier passes counts them too
    tasks = list(tasks)
    fs.makedirs(f"{root}/_rejects", exist_ok=True)
    remove_debris(output_dir)
    names = {t.name for t in tasks}
    done = run_pass(client, output_dir, None, _run_shard, {t.name: t for t in tasks}, desc=stage.name, unit="shard",
                    retries=retries, output_dir=output_dir, process=stage.process, parquet_kwargs=stage.parquet_kwargs)
    marks = [done[name] for name in sorted(names)]
    stats = summarize(stage.name, marks, time.time() - start, config)
    write_json_atomic(stats, f"{root}/_stats.json")
    write_success(output_dir)
    return stats


def write_success(output_dir: str) -> None:
    """Close a folder: `_SUCCESS`, durable like every file a mark or reader trusts."""
    check_held(output_dir)  # a run whose lease was taken over never closes the folder
    fs, root = fsspec.core.url_to_fs(output_dir)
    tmp = f"{root.rstrip('/')}/_tmp-{uuid.uuid4().hex}-SUCCESS"
    with fs.open(tmp, "w") as f:
        f.write("")
    commit_file(fs, tmp, f"{root.rstrip('/')}/_SUCCESS")


MAX_COUNTER_KEYS = 100  # the distinct values a stage's counter keeps in _stats.json; the rest count as "other"


def top_counts(counter: collections.Counter, limit: int = MAX_COUNTER_KEYS) -> dict:
    """The counter's `limit` most common values, the rest summed as "other"."""
    kept = dict(counter.most_common(limit))
    if len(counter) > limit:
        kept["other"] = kept.get("other", 0) + sum(counter.values()) - sum(kept.values())
    return kept


def summarize(stage: str, marks: list[dict], seconds: float, config: dict | None) -> dict:
    """Sum per-shard marks into the stage's `_stats.json` content."""
    reasons: collections.Counter = collections.Counter()
    counters: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for m in marks:
        reasons.update(m["reasons"])
        for name, counts in m["counters"].items():
            counters[name].update(counts)
    rows_in = sum(m["rows_in"] for m in marks)
    return {
        "stage": stage,
        "shards": len(marks),
        "rows_in": rows_in,
        "rows_out": sum(m["rows_out"] for m in marks),
        "rows_rejected": sum(m["rows_rejected"] for m in marks),
        "reasons": dict(reasons.most_common()),
        "counters": {k: top_counts(v) for k, v in counters.items()},
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows_in / seconds, 1) if seconds > 0 else None,
        "config": config or {},
    }


def format_summary(stats: dict) -> str:
    """A plain-text summary table of a stage's stats."""
    lines = [
        f"{stats['stage']} summary",
        f"  {'rows in':<28}{stats['rows_in']:>10}",
        f"  {'rows out':<28}{stats['rows_out']:>10}",
        f"  {'rows rejected':<28}{stats['rows_rejected']:>10}",
    ]
    for reason, n in stats["reasons"].items():
        lines.append(f"    {reason[:50]:<50}{n:>10}")
    for name, counts in stats["counters"].items():
        lines.append(f"  {name}")
        for value, n in list(counts.items())[:12]:
            lines.append(f"    {str(value)[:50]:<50}{n:>10}")
        if len(counts) > 12:
            lines.append(f"    ... {len(counts) - 12} more in _stats.json")
    lines.append(f"  {'seconds':<28}{stats['seconds']:>10.1f}")
    if stats.get("rows_per_second"):
        lines.append(f"  {'rows/s':<28}{stats['rows_per_second']:>10.1f}")
    return "\n".join(lines)
