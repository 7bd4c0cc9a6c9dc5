"""download --retry-failed: fetch again, in place, the rows of a finished download whose failure may pass.

Only `failed_to_download` rows whose message says the failure was the network's or the
server's at that moment are fetched again: timeouts, refused or reset connections, 5xx and 429
answers, rows the downloader lost. 404s, opt-outs (X-Robots-Tag, TDMRep), refusals (size,
scheme) and decode errors stay as they are. One Dask task per shard reads its status and
message columns, fetches its retryable rows with the download's own options through the same
img2dataset glue (`download.fetch_rows`), and rewrites the shard atomically with the row order,
keys and row count unchanged; each fetched row's `retries` count goes up by one. Its progress
mark's counters follow, then a mark in `_retry/done/`.

A round removes `_SUCCESS` first, so no later stage reads a folder half retried, and writes it
again once `_stats.json` holds the new counts and the round (`retry.rounds`, and what each round
fetched and recovered). An interrupted round resumes where it stopped when rerun. Later stages
see the folder's new identity (its round count) and recompute rather than resume.
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

from dallekit.config import BadInputError, DownloadConfig, build_config
from dallekit.io import list_shards, read_shard, shard_index, shard_schema, shard_stem, write_json_atomic, write_table_atomic
from dallekit.pipeline.download import LOST_ROW, RESIZER_VERSION, RETRIES, DownloadShard, fetch_rows, read_file_roots, status_counters
from dallekit.pipeline.passes import map_with_progress
from dallekit.pipeline.shards import input_identity, read_marks, read_stats, shard_checksum, summarize
from dallekit.pipeline.stage import OUTPUT_PACKAGES, check_worker_versions, package_versions

# img2dataset stores str(err): "HTTP Error 503: ...", "<urlopen error [Errno 111] Connection refused>", "timed out", ...
# Anchored at the start: a server's reason phrase ("HTTP Error 403: Connection refused") or a URL in a
# refusal must not make a permanent failure look transient.
RETRYABLE = re.compile(
    r"^(?:HTTP Error (?:5\d\d|429):"
    r"|(?:<urlopen error )?(?:\[Errno -?\d+\] |\[SSL: [A-Z_]+\] )?(?:timed out|The read operation timed out|"
    r"Connection (?:refused|reset by peer|aborted)|Temporary failure in name resolution|EOF occurred in violation of protocol)"
    r"|Remote end closed connection without response|IncompleteRead\(|" + re.escape(LOST_ROW) + "$)"
)
ROUND = "_retry/round.json"


def is_retryable(status: str | None, message: str | None) -> bool:
    """Whether a row's failure may pass on a second try (a timeout, a dropped connection, a 5xx or 429)."""
    return status == "failed_to_download" and bool(message) and RETRYABLE.match(message) is not None


@dataclass(frozen=True)
class RetryShard:
    """One retry task: the download shard to rewrite, and how the download fetched it."""

    path: str
    folder: str
    config: DownloadConfig
    file_roots: tuple[str, ...]


def retry_shard(task: RetryShard) -> dict:
    """Fetch one shard's retryable rows again and rewrite it in place; returns what it retried and recovered."""
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
            source = table.select(table.column_names[: table.column_names.index("key")]).take(rows)  # the URL shard's columns
            download = DownloadShard(task.path, shard_index(task.path), max(1, math.ceil(math.log10(len(rows) + 1))), task.config, task.file_roots)
            fetched = fetch_rows(source, download)
            fetched = fetched.set_column(fetched.column_names.index("key"), "key", table.column("key").take(rows))  # the row keeps its key
            fetched = fetched.append_column(RETRIES, pc.add(table.column(RETRIES).take(rows), 1).cast(pa.int32()))
            fetched = fetched.select(table.column_names).cast(table.schema)
            result["recovered"] = sum(s == "success" for s in fetched.column("status").to_pylist())
            untouched = table.filter(pa.array([not f for f in flags]))
            positions = pa.array([i for i, f in enumerate(flags) if not f] + rows)  # each row's place in the shard
            table = pa.concat_tables([untouched, fetched]).take(pc.sort_indices(positions))
        write_table_atomic(table, task.path)
        fs, root = fsspec.core.url_to_fs(task.folder)
        mark_path = f"{root.rstrip('/')}/_progress/{name}.json"
        with fs.open(mark_path, "r") as f:
            mark = json.load(f)
        write_json_atomic(mark | {"counters": mark["counters"] | status_counters(table)} | shard_checksum(task.path), mark_path)  # keeps the download's `logs`
    write_json_atomic(result, f"{task.folder.rstrip('/')}/_retry/done/{name}.json")
    return result


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


def retry_failed(download_dir: str, client, given: dict | None = None) -> dict:
    """Fetch again the retryable rows of a finished download folder, shard by shard in place; returns its new stats."""
    fs, root = fsspec.core.url_to_fs(download_dir)
    root = root.rstrip("/")
    resuming = fs.exists(f"{root}/{ROUND}")
    if not resuming:
        input_identity(download_dir, ("download",))  # a finished download folder, else bad input naming it
    elif not fs.exists(f"{root}/_stats.json"):
        raise BadInputError(f"{download_dir}: has an interrupted retry but no _stats.json; rerun the download")
    stats = read_stats(download_dir)
    if stats.get("stage") != "download":
        raise BadInputError(f"{download_dir}: holds a `{stats.get('stage')}` stage; --retry-failed takes the output of `dallekit download`")
    config = _retry_config(stats.get("config", {}), given or {}, f"{download_dir}/_stats.json config")
    _check_resizer(fs, root, download_dir)
    _check_versions(fs, root, download_dir, client)
    started = time.time()
    if resuming:
        with fs.open(f"{root}/{ROUND}", "r") as f:
            number = json.load(f)["round"]
        print(f"retry: resuming round {number}")
    else:
        number = (stats.get("retry") or {}).get("rounds", 0) + 1
        fs.makedirs(f"{root}/_retry/done", exist_ok=True)
        write_json_atomic({"round": number}, f"{root}/{ROUND}")
        fs.rm(f"{root}/_SUCCESS")  # later stages must not read the folder while its shards change
    done = {p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.glob(f"{root}/_retry/done/part-*.json")}
    paths = list_shards(download_dir)
    marks = read_marks(download_dir)
    lost = [shard_stem(p) for p in paths if shard_stem(p) not in marks]
    if lost:
        raise BadInputError(f"{download_dir}/_progress/{lost[0]}.json: missing or damaged; rerun the download to finish that shard first")
    roots = _file_roots(fs, root)
    pending = [RetryShard(p, download_dir, config, roots) for p in paths if shard_stem(p) not in done]
    map_with_progress(client, retry_shard, pending, desc="retry", unit="shard", already_done=len(paths) - len(pending))
    results = []
    for p in sorted(fs.glob(f"{root}/_retry/done/part-*.json")):
        with fs.open(p, "r") as f:
            results.append(json.load(f))
    this_round = {"round": number, "retried": sum(r["retried"] for r in results), "recovered": sum(r["recovered"] for r in results),
                  "shards_rewritten": sum(r["retried"] > 0 for r in results), "seconds": round(time.time() - started, 3),
                  "timeout": config.timeout, "retries": config.retries}
    history = (stats.get("retry") or {}).get("history", []) + [this_round]
    marks = read_marks(download_dir)
    new = summarize("download", [marks[shard_stem(p)] for p in paths], stats["seconds"], stats.get("config"))
    new["retry"] = {"rounds": number, "history": history}
    write_json_atomic(new, f"{root}/_stats.json")
    with fs.open(f"{root}/_SUCCESS", "w") as f:
        f.write("")
    fs.rm(f"{root}/_retry", recursive=True)
    print(f"retry: round {number} fetched {this_round['retried']} rows again in {this_round['shards_rewritten']} shards; "
          f"{this_round['recovered']} now succeed")
    return new
