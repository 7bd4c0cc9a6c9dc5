"""STAGES: the one list of Dask stages, as data the CLI and `dallekit run` read without importing the stages.

Each entry names its module (`dallekit.pipeline.<name>`, which defines `STAGE`, `plan_<name>`
and the entry function `<name>`) and declares what the command line shows of it: its one-line
help, its positional inputs (in `plan_<name>`'s order), what its shards hold, its config class
in `dallekit.config` and any further arguments. The CLI builds the stage's subcommand from it;
`commands.stage` plans and runs it. Modules load only when used (encode imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageEntry:
    """One Dask stage as the command line declares it."""

    name: str  # the subcommand, its module's name and its folders' stage name
    summary: str  # the subcommand's one-line help
    inputs: tuple[tuple[str, str, str], ...]  # positional arguments: (dest, nargs or "", help), in plan_<name>'s order
    shards: str  # what its output shards hold, for --out's help: "URL", "image", ...
    config: str  # its config class in dallekit.config, read from the TOML section named like the stage
    extra: tuple[tuple[tuple[str, ...], dict], ...] = ()  # further argparse arguments: (flags, kwargs)
    option_inputs: tuple[str, ...] = ()  # dests of `extra` options that are plan_<name>'s inputs too, after the positionals
    out_required: bool = True  # False where another mode needs no --out (download --retry-failed)

    @property
    def python_name(self) -> str:
        """The stage's name as Python spells it: its module, `plan_<name>` and its entry function `<name>`."""
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:
        """The stage's module."""
        return f"dallekit.pipeline.{self.python_name}"


_RETRY_HELP = "a finished download folder: fetch again, in place, the rows that failed by timeout, connection error, 5xx or 429 (give no URLS or --out)"
_TOKENIZER_HELP = "image tokenizer folder, FSQ or dVAE (from `dallekit train-tokenizer` or `convert-openai-dvae`)"

# In pipeline order. adopt stands in for ingest and download when img2dataset has already downloaded the images.
STAGES = {entry.name: entry for entry in [
    StageEntry("ingest", "URL lists (CC3M, LAION, CSV/TSV/JSONL/Parquet, image folders) -> URL shards",
               (("inputs", "+", "files, globs or folders (local paths or fsspec URLs)"),), "URL", "IngestConfig"),
    StageEntry("download", "URL shards -> image shards with img2dataset's downloader (or --retry-failed DIR: fetch failures again)",
               (("urls", "?", "folder written by `dallekit ingest`"),), "image", "DownloadConfig",
               extra=((("--retry-failed",), {"metavar": "DIR", "help": _RETRY_HELP}),), out_required=False),
    StageEntry("adopt", "an img2dataset output folder (parquet, webdataset or files) -> image shards, with no re-download",
               (("img2dataset_output", "", "folder img2dataset wrote (00000.parquet, ...)"),), "image", "AdoptConfig"),
    StageEntry("clean", "downloaded shards -> repaired captions, no failed downloads or duplicates",
               (("downloaded", "", "folder written by `dallekit download`"),), "cleaned", "CleanConfig"),
    StageEntry("embed", "image shards -> CLIP image and caption embeddings (for filter --embeddings, semantic dedup, search)",
               (("images", "", "folder written by `dallekit clean` (or filter, download, adopt)"),), "embeddings", "EmbedConfig"),
    StageEntry("filter", "cleaned shards -> rows passing image, caption, language and CLIP rules",
               (("cleaned", "", "folder written by `dallekit clean`"),), "filtered", "FilterConfig"),
    StageEntry("encode", "filtered image shards -> token Parquet (image tokenizer codes + BPE ids)",
               (("filtered", "", "folder of image shards (from `dallekit filter`)"),), "token", "EncodeConfig",
               extra=((("--tokenizer", "--dvae"), {"dest": "dvae", "required": True, "help": _TOKENIZER_HELP}),), option_inputs=("dvae",)),
]}
