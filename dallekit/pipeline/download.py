"""download: URL shards -> image shards, one Dask task per shard driving img2dataset's own pieces.

Each task hands img2dataset's `Downloader` (its thread pool, statuses, hashing and EXIF) a
temporary Arrow copy of the shard, because the downloader deletes the file it reads; its rows
come back through `img2dataset_glue.ShardTableWriter` (ParquetSampleWriter's rows, kept in
memory). The result is then put back in input order, every
input row is checked to be there exactly once (a row the downloader lost is kept as failed,
never dropped), and the stage runner renames the shard into place. Download drops nothing:
failed rows keep their status and error message with a null image, and the clean stage
rejects them. Each row also gets the near-duplicate signature clean compares (`phash`,
`color_thumb`, `detail_thumb`, from the stored bytes; null for failed rows), so that clean does
not decode the images again.

What is dallekit's own, around img2dataset's Downloader:

- decoding and resizing: `dallekit.resize.Resizer` (img2dataset's Resizer interface; it reads
  the header before decoding, converts 16-bit images and applies EXIF orientation);
- the network: `dallekit.pipeline.fetch.fetching` installs, for the duration of the task,
  `fetch.PoliteOpener`: robots.txt and the opt-out headers (`optouts`) on every redirect hop,
  per-host connections, rate and Retry-After (`politeness`), retries with backoff, `timeout` as
  a total budget of network time per URL, bodies capped at `max_image_bytes`, and only http(s)
  URLs fetched, file:// ones only with `allow_file_urls` or inside the folders
  `ingest --format folder` read (`_file_roots.json` next to the URL shards); img2dataset gets
  `retries=0` and no header directives, since the opener does both;
- the imports: `img2dataset_glue.downloader_class` imports the downloader without the
  package's CLI (albumentations, webdataset and so torch: ~7 s of CPU a worker);
- temporary folders are named `dallekit-download-<pid>-<random>`, and each task first removes
  those whose process is gone (a killed worker's).

Memory bound of one task: img2dataset's semaphore lets at most 2 x `threads` raw bodies wait
for the resizer, each at most `max_image_bytes` (+1 byte) by the fetch cap: 2 x 64 x 20 MiB =
2.5 GiB with the defaults in the worst case (typical ~100 KB bodies: ~13 MB). Plus one decoded
image, since the resizer runs on one thread and refuses from the header any image of more than
`max_image_area` pixels: at the default 64 Mpx, at most 256 MB for 8-bit RGBA (512 MB for a
16-bit source), with one converted copy alive while converting, matting or rotating. Plus the
resized output, which the writer turns into Arrow every 100 rows.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

# img2dataset imports albumentations, which otherwise asks PyPI for updates, and wandb.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.feather as feather  # noqa: E402

from dallekit.config import DownloadConfig, output_options  # noqa: E402
from dallekit.errors import BadInputError  # noqa: E402
from dallekit.images import signature_columns  # noqa: E402
from dallekit.io import read_shard, shard_index  # noqa: E402
from dallekit.pipeline.fetch import FetchPolicy, fetching, row_outcome  # noqa: E402
from dallekit.pipeline.optouts import agent_names  # noqa: E402
from dallekit.pipeline.politeness import HostLimits  # noqa: E402
from dallekit.pipeline.row_logs import counting_row_logs  # noqa: E402
from dallekit.pipeline.shards import ShardResult, top_counts  # noqa: E402
from dallekit.pipeline.stage import Plan, Stage, run_plan, shard_tasks  # noqa: E402

OOM_SHARD_COUNT = 5  # digits of the shard id in img2dataset's keys and file names
# URLs and long numbers (sizes, byte counts) make each row's message unique; counted as kinds they stay few
_ROW_DETAIL = re.compile(r"(?:https?|file|ftp)://\S+|\d{4,}")
LOST_ROW = "row lost by the downloader"
RETRIES = "retries"  # a column: how many times `download --retry-failed` fetched the row again
FILE_ROOTS = "_file_roots.json"  # written by `ingest --format folder`: {"roots": ["/abs/real/path", ...]}
TMP_PREFIX = "dallekit-download-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")


@dataclass
class DownloadShard:
    """One download task: the URL shard to read, how to number its keys, and where file:// URLs may point."""

    path: str
    shard_id: int
    key_digits: int  # ceil(log10(samples per shard)) over the whole input, so keys never collide
    config: DownloadConfig
    file_roots: tuple[str, ...] = ()  # the folders `ingest --format folder` read (from FILE_ROOTS)


def _make_downloader(config: DownloadConfig, output_folder: str, column_list: list[str], samples_per_shard: int,
                     deliver: Callable[[pa.Table], None]):
    """img2dataset's Downloader with dallekit's Resizer, handing the shard's rows to `deliver`, configured from our options."""
    from dallekit.pipeline.img2dataset_glue import ShardTableWriter, downloader_class
    from dallekit.resize import Resizer

    return downloader_class()(
        sample_writer_class=functools.partial(ShardTableWriter, deliver),
        resizer=Resizer(config),
        thread_count=config.threads,
        save_caption=True,
        extract_exif=config.extract_exif,
        output_folder=output_folder,
        column_list=column_list,
        timeout=config.timeout,  # the fetch opener makes it a total deadline per URL
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash=config.compute_hash or None,
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=0,  # the fetch opener retries, with backoff
        user_agent_token=config.user_agent_token,  # img2dataset puts it in the User-Agent
        disallowed_header_directives=None,  # the fetch opener reads X-Robots-Tag on every hop (optouts)
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives address process groups: never ours to judge
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or not a pid at all: leave it
        return True
    return True


def remove_stale_folders(folder: str) -> list[str]:
    """Remove the download folders in `folder` whose owning process is gone (a killed worker's); returns them."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        found = _TMP_NAME.match(entry.name)
        if found and entry.is_dir(follow_symlinks=False) and not _pid_alive(int(found.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)  # another worker may be removing it too
            removed.append(entry.path)
    return removed


def error_kind(message: str) -> str:
    """An error message without its row's details (URLs, long numbers), so that counts group by kind."""
    return _ROW_DETAIL.sub("<…>", message)


def fetch_policy(config: DownloadConfig, file_roots: tuple[str, ...] = ()) -> FetchPolicy:
    """What the download's options let a task fetch, and how politely."""
    directives = frozenset(d.strip().lower() for d in config.disallowed_header_directives) - {"none"}
    limits = HostLimits(config.per_host_connections, config.per_host_rate, config.max_retry_after)
    return FetchPolicy(config.max_image_bytes, config.allow_file_urls, tuple(file_roots), config.honour_tdm_reservation,
                       robots_txt=config.robots_txt == "obey", agents=agent_names(config.user_agent_token),
                       header_directives=directives, limits=limits, retries=config.retries)


def fetch_rows(source: pa.Table, task: DownloadShard, logs: collections.Counter | None = None) -> pa.Table:
    """Download the rows of `source` with img2dataset as shard `task.shard_id`; every row back once, in input order.

    Dependency log records written once per row (exifread's) are counted into `logs`, not printed.
    """
    remove_stale_folders(tempfile.gettempdir())
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
    config = task.config
    policy = fetch_policy(config, task.file_roots)
    try:
        feather_path = os.path.join(tmp, "input.arrow")
        feather.write_feather(source, feather_path, compression="uncompressed")
        tables: list[pa.Table] = []
        downloader = _make_downloader(config, tmp, source.column_names, 10**task.key_digits, tables.append)
        with fetching(policy), counting_row_logs() as counted:
            ok, _ = downloader((task.shard_id, feather_path))
        if logs is not None:
            logs.update(counted)
        if not ok or len(tables) != 1:  # the downloader printed its traceback; let Dask retry the shard
            raise RuntimeError(f"{task.path}: img2dataset's downloader failed on this shard")
        written = tables[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return with_signatures(_in_input_order(written, source, task))


def with_signatures(table: pa.Table) -> pa.Table:
    """The rows with clean's near-duplicate signature columns (phash, color_thumb, detail_thumb) of their stored image; null for failed rows.

    Computed from the stored bytes with clean's own function (a DCT-reduced decode: about 0.1 ms
    for a 256 px JPEG), so clean reads them instead of decoding every image again, and gets
    the hashes it would have computed itself.
    """
    images = [image if status == "success" else None
              for status, image in zip(table.column("status").to_pylist(), table.column("jpg").to_pylist())]
    for name, column in signature_columns(images).items():
        table = table.append_column(name, column)
    return table


def status_counters(table: pa.Table) -> dict[str, dict[str, int]]:
    """A download shard's counters: rows per status, per kind of error message, and per outcome (robots_txt, rate_limited, ...)."""
    statuses = collections.Counter(table.column("status").to_pylist())
    messages = [e for e in table.column("error_message").to_pylist() if e is not None]
    errors = collections.Counter(error_kind(e) for e in messages)
    outcomes = collections.Counter(o for o in map(row_outcome, messages) if o)
    return {"status": dict(statuses), "error_message": top_counts(errors)} | ({"outcome": dict(outcomes)} if outcomes else {})


def download_shard(task: DownloadShard) -> ShardResult:
    """Download one URL shard with img2dataset and return its rows in input order, none lost."""
    source = read_shard(task.path)
    logs: collections.Counter = collections.Counter()
    table = fetch_rows(source, task, logs)
    table = table.append_column(RETRIES, pa.array([0] * table.num_rows, pa.int32()))
    return ShardResult(rows_in=source.num_rows, kept=table, counters=status_counters(table) | ({"logs": top_counts(logs)} if logs else {}))


def _in_input_order(written: pa.Table, source: pa.Table, task: DownloadShard) -> pa.Table:
    """Sort the downloader's rows (completion order) by input position; add any row it lost as failed."""
    base = task.shard_id * 10**task.key_digits
    positions = [int(k) - base for k in written.column("key").to_pylist()]
    if len(set(positions)) != len(positions) or any(not 0 <= p < source.num_rows for p in positions):
        raise RuntimeError(f"{task.path}: the downloader returned duplicate or foreign keys")
    lost = sorted(set(range(source.num_rows)) - set(positions))
    if lost:
        filler = {name: pa.nulls(len(lost), written.schema.field(name).type) for name in written.column_names}
        for name in source.column_names:
            filler[name] = source.column(name).take(lost)
        filler["key"] = pa.array([f"{base + p:0{task.key_digits + OOM_SHARD_COUNT}d}" for p in lost])
        filler["status"] = pa.array(["failed_to_download"] * len(lost))
        filler["error_message"] = pa.array([LOST_ROW] * len(lost))
        written = pa.concat_tables([written, pa.table(filler, schema=written.schema)])
        positions += lost
    order = sorted(range(len(positions)), key=positions.__getitem__)
    table = written.take(order)
    # uid first, then the ingest columns, then img2dataset's columns in its order
    front = ["uid", "url", "caption"]
    return table.select(front + [c for c in table.column_names if c not in front])


def read_file_roots(input_dir: str) -> tuple[str, ...]:
    """The folders `ingest --format folder` read, from the URL shards' FILE_ROOTS (none when it is absent)."""
    fs, root = fsspec.core.url_to_fs(input_dir)
    path = f"{root.rstrip('/')}/{FILE_ROOTS}"
    if not fs.exists(path):
        return ()
    try:
        with fs.open(path, "rb") as f:
            roots = json.load(f)["roots"]
    except (ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{input_dir}/{FILE_ROOTS}: not a JSON object with a 'roots' list ({err})") from None
    if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
        raise BadInputError(f"{input_dir}/{FILE_ROOTS}: 'roots' must be a list of absolute paths")
    return tuple(roots)


STAGE = Stage("download", ("ingest",), frozenset({"uid", "url", "caption"}), "URL shards from `dallekit ingest`", download_shard)

# what dallekit.resize computes, in the fingerprint: a folder written by an older resizer (full
# decodes of large JPEGs) is not resumed with shards of another; bump it when the pixels change
RESIZER_VERSION = "reduced-jpeg-decode-registered"  # issue 28: reduced sides rounded up by libjpeg are resized from the full size


# how opt-outs are read, in the fingerprint: a folder downloaded under img2dataset's X-Robots-Tag parser
# and without robots.txt is not resumed under ours (bump it when a rule reads headers or robots.txt differently)
OPT_OUTS_VERSION = "robots-txt-google-x-robots-tag"  # issue 31


def plan_download(input_dir: str, config: DownloadConfig) -> Plan:
    """One task per URL shard; checks the shards have the columns ingest writes and reads the file:// roots."""
    for name in ("threads", "image_size"):
        if getattr(config, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} {getattr(config, name)}: expected a positive number")
    identity, paths, rows = STAGE.input_of(input_dir, finished=False)  # hand-made URL shards are welcome
    key_digits = max(1, math.ceil(math.log10(max(rows + [1]))))
    roots = read_file_roots(input_dir)
    options = output_options(config) | {  # spelled-out defaults and reordered directives are the same output
        "encode_quality": config.quality,
        "disallowed_header_directives": sorted({d.strip().lower() for d in config.disallowed_header_directives}),
        "resizer": RESIZER_VERSION,
        "opt_outs": OPT_OUTS_VERSION,
    }
    return Plan(inputs=[input_dir], fingerprint={"input": identity, "options": options}, stats_config=asdict(config) | {"input": input_dir},
                tasks=lambda _, __: shard_tasks(paths, lambda p: DownloadShard(p, shard_index(p), key_digits, config, roots)))


def refuse_during_retry(output_dir: str) -> None:
    """A download folder in the middle of a `--retry-failed` round is finished by the retry, not by a rerun of the download."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    if fs.exists(f"{root.rstrip('/')}/_retry/round.json"):
        raise BadInputError(f"--out {output_dir}: a --retry-failed round is under way there; "
                            f"finish it with `dallekit download --retry-failed {output_dir}`")


def download(input_dir: str, output_dir: str, config: DownloadConfig, client, plan: Plan | None = None) -> dict:
    """Run the download stage over every URL shard of `input_dir`."""
    refuse_during_retry(output_dir)
    return run_plan(STAGE, plan or plan_download(input_dir, config), output_dir, client, config.overwrite)
