"""download --retry-failed: fetch again, in place, the rows of a finished download whose failure may pass.

Only `failed_to_download` rows whose message says the failure was the network's or the
server's at that moment are fetched again: timeouts, refused or reset connections, 5xx and 429
answers, rows the downloader lost, rows kept by a host that asked to wait or stopped answering
or whose robots.txt could not be read. 404s, opt-outs (robots.txt rules, X-Robots-Tag, TDMRep), refusals (size,
scheme) and decode errors stay as they are. One Dask task per shard reads its status and
message columns, fetches its retryable rows with the download's own options through the same
img2dataset glue (`download.fetch_rows`), and rewrites the shard atomically with the row order,
keys and row count unchanged; each fetched row's `retries` count goes up by one. The round is a
pass of the engine (`pipeline/passes.py`, pass `retry` over the download folder): a task
rewrites its shard and the shard's download mark (`passes.write_mark`, vouching for the new
file), then the engine marks the task.

A round holds the download folder's lease from start to end, so a second retry (or a download
into the folder) is refused, naming it. Every precondition (a finished download, every shard's
mark whole, the options, the resizer, the package versions) is checked before anything changes;
only then is `_retry/round.json` written and `_SUCCESS` removed, so no later stage reads a
folder half retried. `_SUCCESS` is written again once `_stats.json` holds the new counts and the
round (`retry.rounds`, and what each round fetched and recovered). An interrupted round resumes
where it stopped when rerun. Later stages see the folder's new identity (its round count) and
recompute rather than resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.config import DownloadConfig, build_config
from dallekit.errors import BadInputError
from dallekit.io import list_shards, read_shard, shard_index, shard_schema, shard_stem, write_json_atomic, write_table_atomic
from dallekit.pipeline.download import LOST_ROW, RESIZER_VERSION, RETRIES, DownloadShard, fetch_rows, read_file_roots, status_counters
from dallekit.pipeline.optouts import ROBOTS_UNAVAILABLE
from dallekit.pipeline.passes import Mark, clear_marks, hold_folder, read_marks, run_pass, write_mark
from dallekit.pipeline.politeness import HOST_SILENT, RATE_LIMITED
from dallekit.pipeline.shards import input_identity, read_stats, summarize, write_success
from dallekit.pipeline.stage import OUTPUT_PACKAGES, check_worker_versions, package_versions

# img2dataset stores str(err): "HTTP Error 503: ...", "<urlopen error [Errno 111] Connection refused>", "timed out", ...
# Anchored at the start: a server's reason phrase ("HTTP Error 403: Connection refused") or a URL in a
# refusal must not make a permanent failure look transient.
RETRYABLE = re.compile(
    r"^(?:HTTP Error (?:5\d\d|429):"
    r"|(?:<urlopen error )?(?:\[Errno -?\d+\] |\[SSL: [A-Z_]+\] )?(?:timed out|The read operation timed out|"
    r"Connection (?:refused|reset by peer|aborted)|Temporary failure in name resolution|EOF occurred in violation of protocol)"
    r"|Remote end closed connection without response|IncompleteRead\(|" + re.escape(LOST_ROW) + "$"
    # the host asked to wait, stopped answering, or its robots.txt could not be read (politeness, optouts)
    r"|" + "|".join(re.escape(m) + ":" for m in (RATE_LIMITED, HOST_SILENT, ROBOTS_UNAVAILABLE)) + ")"
)
ROUND = "_retry/round.json"  # the round under way (download's refuse_during_retry reads it too)
PASS = "retry"  # the engine's pass of a round over the download folder
LEGACY_DONE = "_retry/done"  # where dallekit <= 0.29 marked a round's finished shards


def is_retryable(status: str | None, message: str | None) -> bool:
    """Whether a row's failure may pass on a second try (a timeout, a dropped connection, a 5xx or 429)."""
    return status == "failed_to_download" and bool(message) and RETRYABLE.match(message) is not None


@dataclass(frozen=True)
class RetryShard:
    """One retry task: the download shard to rewrite, how the download fetched it, and its download mark."""

    path: str
    folder: str
    config: DownloadConfig
    file_roots: tuple[str, ...]
    mark: dict  # the shard's download mark (its result), rewritten with the new counters
    vouched: tuple[str, ...]  # the files that mark vouches for (the shard), vouched for again after the rewrite


def retry_shard(task: RetryShard) -> dict:
    """Fetch one shard's retryable rows again and rewrite it in place, then its download mark; returns what it retried and recovered."""
    name = shard_stem(task.path)
    failures = read_shard(task.path, columns=["status", "error_message"])  # most shards have nothing to retry: no images read
    flags = [is_retryable(s, m) for s, m in zip(failures.column("status").to_pylist(), failures.column("error_message").to_pylist())]
    rows = [i for i, f in enumerate(flags) if f]
    old_layout = RETRIES not in shard_schema(task.path)[0].names  # a folder from before the column: every shard gets it
    result = {"shard": name, "retried": len(rows), "recovered": 0}
    if rows or old_layout:
        table = read_shard(task.path)
        if old_layout:
            table = table.append_column(RETRIES, pa.array([0] * table.num_rows, pa.int32()))
        if rows:
            table, result["recovered"] = _fetch_again(task, table, flags, rows)
        write_table_atomic(table, task.path)
        counters = task.mark["counters"] | status_counters(table)  # keeps the download's `logs`
        write_mark(task.folder, name, task.mark | {"counters": counters}, list(task.vouched))  # the download's own mark, pass None
    return result


def _fetch_again(task: RetryShard, table: pa.Table, flags: list[bool], rows: list[int]) -> tuple[pa.Table, int]:
    """The shard with its retryable rows fetched again, each in its place; and how many now succeed."""
    source = table.select(table.column_names[: table.column_names.index("key")]).take(rows)  # the URL shard's columns
    download = DownloadShard(task.path, shard_index(task.path), max(1, math.ceil(math.log10(len(rows) + 1))), task.config, task.file_roots)
    fetched = fetch_rows(source, download)
    fetched = fetched.set_column(fetched.column_names.index("key"), "key", table.column("key").take(rows))  # the row keeps its key
    fetched = fetched.append_column(RETRIES, pc.add(table.column(RETRIES).take(rows), 1).cast(pa.int32()))
    fetched = fetched.select(table.column_names).cast(table.schema)
    recovered = sum(s == "success" for s in fetched.column("status").to_pylist())
    untouched = table.filter(pa.array([not f for f in flags]))
    positions = pa.array([i for i, f in enumerate(flags) if not f] + rows)  # each row's place in the shard
    return pa.concat_tables([untouched, fetched]).take(pc.sort_indices(positions)), recovered


def _retry_config(stored: dict, given: dict, where: str) -> DownloadConfig:
    """The download's own options, with the ones that do not change its output (threads, timeout, retries) as given."""
    fields = {f.name: f for f in dataclasses.fields(DownloadConfig)}
    for name, value in given.items():
        if fields[name].metadata.get("output", True) and name != "overwrite" and stored.get(name, fields[name].default) != value:
            raise BadInputError(f"--{name.replace('_', '-')} {value}: a retry keeps the download's own options "
                                f"({stored.get(name)!r} here); only options such as --threads, --timeout and --retries may change")
    section = {k: v for k, v in stored.items() if k in fields and v is not None and k not in given}
    return build_config(DownloadConfig, argparse.Namespace(**given), section, where=where)  # a hand-edited value is checked too


def _check_resizer(fs, root: str, download_dir: str) -> None:
    """A folder another version of the resizer wrote would get rows of this one mixed in: refused."""
    try:
        with fs.open(f"{root}/_fingerprint.json", "r") as f:
            written_by = json.load(f)["options"].get("resizer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        written_by = None
    if written_by != RESIZER_VERSION:
        raise BadInputError(f"{download_dir}: written by another version of dallekit's resizer ({written_by or 'full JPEG decodes'}, "
                            f"not {RESIZER_VERSION}); its rows would not match the retried ones: rerun the download with --overwrite")


def _check_versions(fs, root: str, download_dir: str, client) -> None:
    """Rows fetched under other package versions than the folder's would be mixed with its rows: refused, here and on the workers."""
    with fs.open(f"{root}/_fingerprint.json", "r") as f:
        written_with = json.load(f).get("versions")
    versions = package_versions(OUTPUT_PACKAGES["download"])
    if written_with is not None and written_with != versions:
        changed = ", ".join(f"{name} {written_with.get(name)} -> {mine}" for name, mine in versions.items() if written_with.get(name) != mine)
        raise BadInputError(f"{download_dir}: downloaded with other package versions ({changed}); its rows would not match "
                            "the retried ones: install those versions, or rerun the download with --overwrite")
    check_worker_versions(client, "retry", versions)


def _file_roots(fs, root: str) -> tuple[str, ...]:
    """The folders the URL shards' ingest read (file:// URLs stay allowed there), found through the resolved input path."""
    try:
        with fs.open(f"{root}/_fingerprint.json", "r") as f:
            source = json.load(f)["input"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    return read_file_roots(source) if isinstance(source, str) and fs.exists(source) else ()


@dataclass
class Round:
    """A retry round whose every precondition held: what it runs over, and whether it resumes one under way."""

    number: int
    resuming: bool
    stats: dict
    config: DownloadConfig
    paths: list[str]
    marks: dict[str, Mark]  # the download's marks, by shard


def _check_marks(download_dir: str, paths: list[str], resuming: bool) -> dict[str, Mark]:
    """Every shard's download mark, each vouching for its shard; bad input naming the first that does not (nothing is removed)."""
    whole = read_marks(download_dir, verify=True, remove_damaged=False)
    marks = whole if not resuming else read_marks(download_dir, verify=False, remove_damaged=False)
    for path in paths:
        name = shard_stem(path)
        if name in whole or (resuming and name in marks and _rewritten(path, marks[name])):
            continue
        if resuming:
            raise BadInputError(f"{download_dir}: {name}.parquet is not the shard its mark vouches for (missing, truncated or replaced) "
                                f"in the middle of a retry round; remove {download_dir}/_retry, rerun the download into this folder "
                                "to redo that shard, then --retry-failed")
        raise BadInputError(f"{download_dir}: {name}.parquet is not the shard its mark vouches for (its mark is missing or damaged, "
                            "or the shard is missing, truncated or replaced); rerun the download into this folder to redo that shard, "
                            "then --retry-failed")
    return marks


def _rewritten(path: str, mark: Mark) -> bool:
    """Whether a shard whose mark no longer vouches for it is one an interrupted round rewrote: whole, with the mark's rows."""
    try:
        return shard_schema(path)[1] == mark.result.get("rows_out")
    except BadInputError:
        return False


def _check_round(download_dir: str, client, given: dict) -> Round:
    """Every precondition of a round, checked before anything in the folder changes; the round to run."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    root = root.rstrip("/")
    resuming = fs.exists(f"{root}/{ROUND}")
    if not resuming:
        input_identity(download_dir, ("download",))  # a finished download folder, else bad input naming it
    elif not fs.exists(f"{root}/_stats.json"):
        raise BadInputError(f"{download_dir}: has an interrupted retry but no _stats.json; remove {download_dir}/_retry "
                            "and rerun the download into this folder")
    stats = read_stats(download_dir)
    if stats.get("stage") != "download":
        raise BadInputError(f"{download_dir}: holds a `{stats.get('stage')}` stage; --retry-failed takes the output of `dallekit download`")
    if not isinstance(stats.get("config", {}), dict):
        raise BadInputError(f"{download_dir}/_stats.json: its config is {json.dumps(stats['config'])[:60]}, "
                            "expected a JSON object of the download's options")
    config = _retry_config(stats.get("config", {}), given, f"{download_dir}/_stats.json config")
    _check_resizer(fs, root, download_dir)
    paths = list_shards(download_dir)
    marks = _check_marks(download_dir, paths, resuming)
    _check_versions(fs, root, download_dir, client)
    number = _round_number(fs, f"{root}/{ROUND}") if resuming else (stats.get("retry") or {}).get("rounds", 0) + 1
    return Round(number, resuming, stats, config, paths, marks)


def _round_number(fs, path: str) -> int:
    """The number of the round under way, from `_retry/round.json`; bad input naming the file when it is damaged."""
    try:
        with fs.open(path, "rb") as f:
            number = json.loads(f.read()).get("round")
    except (ValueError, AttributeError):
        number = None
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise BadInputError(f"{path}: damaged (expected {{\"round\": <the round's number, 1 or more>}}); "
                            "write the number of the round under way there and rerun, or rerun the download")
    return number


def retry_failed(download_dir: str, client, given: dict | None = None) -> dict:
    """Fetch again the retryable rows of a finished download folder, shard by shard in place; returns its new stats."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    if not fs.isdir(root):
        raise BadInputError(f"{download_dir}: no such folder")
    with hold_folder(download_dir, "download --retry-failed"):  # one writer: a second retry or a download is refused, naming this one
        job = _check_round(download_dir, client, given or {})
        return _run_round(download_dir, job, client)


def _begin_round(download_dir: str, job: Round) -> None:
    """Open the round (its number in `_retry/round.json`, `_SUCCESS` removed), or take up the one under way."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    root = root.rstrip("/")
    if job.resuming:
        print(f"retry: resuming round {job.number}")
        _adopt_legacy_marks(download_dir, job)
        return
    clear_marks(download_dir, PASS)  # left by a round abandoned by hand: this round retries every shard
    write_json_atomic({"round": job.number}, f"{root}/{ROUND}")
    fs.rm(f"{root}/_SUCCESS")  # later stages must not read the folder while its shards change


def _adopt_legacy_marks(download_dir: str, job: Round) -> None:
    """A round the previous version began: its `_retry/done/` marks become the engine's, for shards whose download mark is whole."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    done = f"{root.rstrip('/')}/{LEGACY_DONE}"
    if not fs.exists(done):
        return
    whole = read_marks(download_dir, verify=True, remove_damaged=False)
    by_name = {shard_stem(p): p for p in job.paths}
    for path in sorted(fs.glob(f"{done}/part-*.json")):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            with fs.open(path, "r") as f:
                result = json.load(f)
        except ValueError:
            continue  # damaged: that shard is retried again
        if name in whole and name in by_name and isinstance(result, dict) and {"retried", "recovered"} <= set(result):
            write_mark(download_dir, name, result, [by_name[name]], PASS)
    fs.rm(done, recursive=True)


def _run_round(download_dir: str, job: Round, client) -> dict:
    """The round's pass over the shards not yet retried, then the new `_stats.json`, `_SUCCESS`, and the round's files removed."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    root = root.rstrip("/")
    _begin_round(download_dir, job)
    if (job.stats.get("retry") or {}).get("rounds", 0) >= job.number:  # stopped after its stats were written: only closing is left
        new, this_round = job.stats, job.stats["retry"]["history"][-1]
    else:
        new, this_round = _retry_shards(download_dir, job, client)
    write_success(download_dir)
    clear_marks(download_dir, PASS)
    fs.rm(f"{root}/_retry", recursive=True)
    print(f"retry: round {job.number} fetched {this_round['retried']} rows again in {this_round['shards_rewritten']} shards; "
          f"{this_round['recovered']} now succeed")
    return new


def _retry_shards(download_dir: str, job: Round, client) -> tuple[dict, dict]:
    """One task per shard not yet retried this round; the folder's new stats (written) and this round's line of its history."""
    started = time.time()
    fs, root = fsspec.core.url_to_fs(download_dir)
    roots = _file_roots(fs, root.rstrip("/"))
    tasks = {}
    for path in job.paths:
        mark = job.marks[shard_stem(path)]
        vouched = tuple(f"{download_dir.rstrip('/')}/{relative}" for relative in mark.outputs)
        tasks[shard_stem(path)] = RetryShard(path, download_dir, job.config, roots, mark.result, vouched)
    results = list(run_pass(client, download_dir, PASS, retry_shard, tasks, desc="retry", unit="shard").values())
    this_round = {"round": job.number, "retried": sum(r["retried"] for r in results), "recovered": sum(r["recovered"] for r in results),
                  "shards_rewritten": sum(r["retried"] > 0 for r in results), "seconds": round(time.time() - started, 3),
                  "timeout": job.config.timeout, "retries": job.config.retries}
    history = (job.stats.get("retry") or {}).get("history", []) + [this_round]
    marks = read_marks(download_dir, verify=False, remove_damaged=False)
    new = summarize("download", [marks[shard_stem(p)].result for p in job.paths], job.stats["seconds"], job.stats.get("config"))
    new["retry"] = {"rounds": job.number, "history": history}
    write_json_atomic(new, f"{download_dir.rstrip('/')}/_stats.json")
    return new, this_round
