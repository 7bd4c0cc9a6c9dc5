"""download: URL shards -> image shards, one Dask task per shard driving img2dataset's own pieces.

Each task hands img2dataset's `Downloader` (with its `Resizer` and `ParquetSampleWriter`) a
temporary Arrow copy of the shard, because the downloader deletes the file it reads and writes
its Parquet in place. The result is then put back in input order, every input row is checked to
be there exactly once (a row the downloader lost is kept as failed, never dropped), and the
stage runner renames the shard into place. Download drops nothing: failed rows keep their
status and error message with a null image, and the clean stage rejects them.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

# img2dataset imports albumentations, which otherwise asks PyPI for updates, and wandb.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pyarrow as pa  # noqa: E402
import pyarrow.feather as feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dallekit.config import BadInputError, DownloadConfig  # noqa: E402
from dallekit.pipeline.shards import ShardResult, ShardTask, list_shards, read_shard, run_stage, shard_schema  # noqa: E402

OOM_SHARD_COUNT = 5  # digits of the shard id in img2dataset's keys and file names
MAX_ERROR_KINDS = 100  # distinct error messages counted per shard; the rest count as "other"
LOST_ROW = "row lost by the downloader"


@dataclass
class DownloadShard:
    """One download task: the URL shard to read and how to number its keys."""

    path: str
    shard_id: int
    key_digits: int  # ceil(log10(samples per shard)) over the whole input, so keys never collide
    config: DownloadConfig


def _make_downloader(config: DownloadConfig, output_folder: str, column_list: list[str], samples_per_shard: int):
    """img2dataset's Downloader with its Resizer and Parquet writer, configured from our options."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    resizer = Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_area,
        max_aspect_ratio=config.max_aspect_ratio,
    )
    directives = [d for d in config.disallowed_header_directives if d.lower() != "none"]
    return Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=config.threads,
        save_caption=True,
        extract_exif=config.extract_exif,
        output_folder=output_folder,
        column_list=column_list,
        timeout=config.timeout,
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash=config.compute_hash or None,
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=directives or None,
    )


def download_shard(task: DownloadShard) -> ShardResult:
    """Download one URL shard with img2dataset and return its rows in input order, none lost."""
    source = read_shard(task.path)
    tmp = tempfile.mkdtemp(prefix="dallekit-download-")
    try:
        feather_path = os.path.join(tmp, "input.arrow")
        feather.write_feather(source, feather_path, compression="uncompressed")
        downloader = _make_downloader(task.config, tmp, source.column_names, 10**task.key_digits)
        ok, _ = downloader((task.shard_id, feather_path))
        if not ok:  # the downloader printed its traceback; let Dask retry the shard
            raise RuntimeError(f"{task.path}: img2dataset's downloader failed on this shard")
        written = pq.read_table(os.path.join(tmp, f"{task.shard_id:0{OOM_SHARD_COUNT}d}.parquet"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = _in_input_order(written, source, task)
    statuses = collections.Counter(table.column("status").to_pylist())
    errors = collections.Counter(e for e in table.column("error_message").to_pylist() if e is not None)
    kinds = dict(errors.most_common(MAX_ERROR_KINDS))
    if len(errors) > MAX_ERROR_KINDS:
        kinds["other"] = sum(errors.values()) - sum(kinds.values())
    return ShardResult(rows_in=source.num_rows, kept=table, counters={"status": dict(statuses), "error_message": kinds})


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


def plan_download(input_dir: str, config: DownloadConfig) -> list[ShardTask]:
    """One task per URL shard; checks the shards have the columns ingest writes."""
    for name in ("threads", "image_size"):
        if getattr(config, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} {getattr(config, name)}: expected a positive number")
    paths = list_shards(input_dir)
    rows = []
    for path in paths:
        schema, n_rows = shard_schema(path)
        missing = {"uid", "url", "caption"} - set(schema.names)
        if missing:
            raise BadInputError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected URL shards from `dallekit ingest`)")
        rows.append(n_rows)
    key_digits = max(1, math.ceil(math.log10(max(rows + [1]))))
    tasks = []
    for path in paths:
        name = os.path.basename(path).removesuffix(".parquet")
        shard_id = int(name.split("-")[1])
        tasks.append(ShardTask(name, DownloadShard(path, shard_id, key_digits, config)))
    return tasks


def download(input_dir: str, output_dir: str, config: DownloadConfig, client, tasks: list[ShardTask] | None = None) -> dict:
    """Run the download stage over every URL shard of `input_dir`."""
    tasks = tasks if tasks is not None else plan_download(input_dir, config)
    return run_stage("download", output_dir, tasks, download_shard, client, config=asdict(config) | {"input": input_dir})
