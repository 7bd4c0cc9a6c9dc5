"""img2dataset's Downloader as a download task uses it: imported without its CLI, writing its rows to memory.

- `import img2dataset.downloader` first runs `img2dataset/__init__.py`, which imports the CLI
  (`img2dataset.main`) and with it albumentations, the reader, the distributor and the writers;
  the writers import webdataset, which imports torch. That is about 7 s of CPU in every worker
  for modules a download task never calls (a 3000-image download on 2 workers spends ~15% of
  its CPU there). `downloader_class` imports the downloader module alone: the package enters
  `sys.modules` with its path only, and its `main` and `download` still resolve on first use.
- `ShardTableWriter` takes the place of img2dataset's `ParquetSampleWriter`: the same rows,
  columns and Arrow types, kept as an Arrow table instead of a temporary Parquet file that the
  task wrote only to read it back.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable

import pyarrow as pa

_IMPORT_LOCK = threading.Lock()
FLUSH_ROWS = 100  # rows gathered before they become a record batch (img2dataset's writer flushes every 100 too)


def _package_attribute(name: str):
    """img2dataset's `main` and `download` (its __init__'s names), imported on first use."""
    if name not in ("main", "download"):
        raise AttributeError(f"module 'img2dataset' has no attribute {name!r}")
    cli = importlib.import_module("img2dataset.main")
    package = sys.modules["img2dataset"]
    package.main, package.download = cli.main, cli.download  # the function, as __init__ binds it, not the submodule
    return getattr(package, name)


def downloader_class() -> type:
    """img2dataset's Downloader class, without running the package's __init__ (and its CLI's imports)."""
    with _IMPORT_LOCK:
        if "img2dataset" not in sys.modules:
            spec = importlib.util.find_spec("img2dataset")
            if spec is None:
                raise ImportError("img2dataset is not installed")
            package = importlib.util.module_from_spec(spec)  # the package object, its __init__ not run
            package.__getattr__ = _package_attribute
            sys.modules["img2dataset"] = package
        from img2dataset.downloader import Downloader

    return Downloader


class ShardTableWriter:
    """img2dataset's sample-writer interface (as ParquetSampleWriter's): the shard's rows as an Arrow table, handed to `deliver` on close."""

    def __init__(self, deliver: Callable[[pa.Table], None], shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        # the bytes go in `jpg` whatever the encoding (img2dataset names the column after it): every stage reads `jpg`
        self.deliver, self.save_caption, self.encode_format = deliver, save_caption, "jpg"
        self.schema = schema.append(pa.field("jpg", pa.binary()))
        self.batches: list[pa.RecordBatch] = []
        self.rows: dict[str, list] = {name: [] for name in self.schema.names}
        self.buffered = 0

    def write(self, img_str, key, caption, meta) -> None:
        """Add one row: as ParquetSampleWriter, the caption is null when the image is."""
        sample = {"key": key, self.encode_format: img_str}
        if self.save_caption:
            sample["txt"] = (str(caption) if caption is not None else "") if img_str is not None else None
        sample.update(meta)
        for name in self.schema.names:
            self.rows[name].append(sample[name])
        self.buffered += 1
        if self.buffered >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            self.batches.append(pa.RecordBatch.from_pydict(self.rows, schema=self.schema))
            self.rows, self.buffered = {name: [] for name in self.schema.names}, 0

    def close(self) -> None:
        """Hand over the rows written, as one table."""
        self._flush()
        self.deliver(pa.Table.from_batches(self.batches, schema=self.schema))
