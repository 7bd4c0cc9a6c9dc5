"""Dataclass configs: one per subcommand, each option usable from the CLI and from a TOML file.

An option is declared once, with `option()`: its help, type (the annotation), range, choices
and whether it changes a stage's output. `add_options` turns the fields into argparse options
and `build_config` merges a TOML section with the options given on the command line (the
command line wins), then checks every value the same way whatever its source. A lone string
where a list is expected is taken as a one-element list. There is no other config system.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is the standard library's copy of tomli, from 3.11
    import tomli as tomllib

from dallekit.errors import BadInputError


class OptionError(ValueError):
    """A config's own check failed for one option; build_config names where the value came from."""

    def __init__(self, name: str, expected: str, value: Any = None):
        super().__init__(f"{name}: expected {expected}")
        self.name, self.expected, self.value = name, expected, value


def option(
    default: Any,
    help: str,
    *,
    bounds: str | None = None,
    choices: list | None = None,
    pattern: str | None = None,
    output: bool = True,
    nargs: str | None = None,
) -> Any:
    """A dataclass field: CLI help, its bounds and choices, checked the same for CLI and TOML values.

    `bounds` is an interval, "[1, 4096]", "(0, 1)" or "[0, inf)": a square bracket includes its
    end, a round one does not. `output=False` marks an option that does not change what a stage
    writes (threads, batch sizes, devices): it is left out of the stage's fingerprint, so a
    rerun may change it. `nargs` is argparse's, for list options.
    """
    metadata = {"help": help, "range": _interval(bounds), "choices": choices, "pattern": pattern, "output": output,
                "argparse": {"nargs": nargs} if nargs else {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _interval(bounds: str | None) -> tuple[float | None, float | None, float | None, float | None]:
    """(ge, gt, le, lt) of an interval such as "[1, 4096]" or "(0, inf)"; all None without one."""
    if bounds is None:
        return (None,) * 4
    match = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^\])]+)([\])])", bounds.strip())
    if not match:
        raise ValueError(f"bounds {bounds!r}: expected an interval such as '[1, 4096]' or '(0, inf)'")
    left, low, high, right = match.groups()
    low_value, high_value = float(low), float(high)
    low_value = None if math.isinf(low_value) else (int(low_value) if low_value.is_integer() else low_value)
    high_value = None if math.isinf(high_value) else (int(high_value) if high_value.is_integer() else high_value)
    return (low_value if left == "[" else None, low_value if left == "(" else None,
            high_value if right == "]" else None, high_value if right == ")" else None)


DEVICE = r"auto|cpu|mps|cuda(:\d+)?"  # the torch devices an option may name
MEMORY_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.I)  # a size such as 4GB, 512MB, 2GiB or bytes
MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_bytes(text: str) -> int | None:
    """'4GB', '512MiB', '1.5GB' or a number of bytes, as bytes; None when it is not such a size."""
    match = MEMORY_SIZE.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        return None
    return int(float(match.group(1)) * MEMORY_UNITS[(match.group(2) or "B").lower()])


def output_options(config: Any) -> dict:
    """The options of a config that change a stage's output, for its fingerprint."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("output", True)}


@dataclass
class ClusterConfig:
    """Where the Dask tasks run."""

    scheduler: str | None = option(None, "address of an existing Dask scheduler (else DASK_SCHEDULER_ADDRESS, else a LocalCluster)", output=False)
    workers: int | None = option(None, "worker processes of the local cluster (default: one per core)", bounds="[1, inf)", output=False)
    threads_per_worker: int = option(1, "threads per local worker process", bounds="[1, inf)", output=False)
    processes: bool = option(True, "local workers as processes (--no-processes: threads in this process, for debugging)", output=False)
    host: str = option("127.0.0.1", "interface the local cluster's scheduler, workers and dashboards listen on", output=False)

    def check(self) -> None:
        """Dask's address parser takes an IPv4 address or a host name here."""
        if not self.host or ":" in self.host:
            raise OptionError("host", "an IPv4 address or host name such as 127.0.0.1 (IPv6 is not supported for the local cluster)")


@dataclass
class StageOptions:
    """Options every Dask stage has."""

    overwrite: bool = option(False, "start afresh when --out holds this stage run with other inputs or options", output=False)


@dataclass
class IngestConfig(StageOptions):
    """Options of `dallekit ingest`."""

    format: str = option("auto", "input format", choices=["auto", "cc3m", "laion", "csv", "tsv", "jsonl", "parquet", "folder"])
    url_col: str | None = option(None, "URL column (default: url, or URL for LAION)")
    caption_col: str | None = option(None, "caption column (default: caption, or TEXT for LAION)")
    shard_size: int = option(10000, "input rows per output shard", bounds="[1, inf)")
    allow_file_urls: bool = option(False, "accept file:// URLs in tabular inputs (always allowed for --format folder)")
    block_bytes: int = option(64 * 2**20, "bytes of a text input read by one task", bounds="[1, inf)", output=False)


@dataclass
class DownloadConfig(StageOptions):
    """Options of `dallekit download`; names and defaults follow img2dataset's."""

    image_size: int = option(256, "side of the resized image in pixels", bounds="[1, 16384]")
    resize_mode: str = option("center_crop", "img2dataset resize mode", choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"])
    resize_only_if_bigger: bool = option(False, "only downscale, never upscale")
    threads: int = option(64, "download threads per shard task (img2dataset's thread_count)", bounds="[1, 4096]", output=False)
    timeout: float = option(10, "seconds of network time one URL may take in all: redirects, retries and backoff included, "
                            "waiting for its host's turn not", bounds="(0, 86400]", output=False)
    retries: int = option(0, "extra tries per URL after a timeout, a failed connection or a 5xx, with backoff within --timeout "
                          "(429/503 answers are tried again anyway)", bounds="[0, 100]", output=False)
    encode_format: str = option("jpg", "format of the stored image bytes", choices=["jpg", "png", "webp"])
    encode_quality: int | None = option(None, "JPEG/WebP quality 0-100 (default 95), or PNG compression 0-9 (default 3)", bounds="[0, 100]")
    min_image_size: int = option(0, "reject images whose shorter side is below this (pixels)", bounds="[0, inf)")
    max_image_area: float = option(64e6, "reject images with more pixels than this, read from the header before decoding", bounds="(0, inf)")
    max_image_bytes: int = option(20 * 2**20, "abandon a download whose body is larger than this many bytes", bounds="[1, inf)")
    max_aspect_ratio: float = option(math.inf, "reject images whose long/short side ratio exceeds this", bounds="[1, inf)")
    extract_exif: bool = option(True, "keep EXIF as a JSON string column")
    compute_hash: str = option("sha256", "hash of the raw downloaded bytes, kept as a column (clean's exact dedup reads it)", choices=["sha256"])
    user_agent_token: str | None = option(None, "token added to the User-Agent and matched in X-Robots-Tag", pattern=r"[A-Za-z0-9._+-]{1,64}")
    disallowed_header_directives: list[str] = option(
        ["noai", "noimageai", "noindex", "noimageindex"],
        "X-Robots-Tag directives that opt an image out ('none' to honour none)",
        nargs="+",
    )
    allow_file_urls: bool = option(False, "read file:// URLs anywhere (else only inside the folders `ingest --format folder` read)")
    honour_tdm_reservation: bool = option(True, "treat a `tdm-reservation: 1` response header (W3C TDMRep) as an opt-out")
    robots_txt: str = option("obey", "honour each host's robots.txt for img2dataset, the --user-agent-token and '*' (obey) or not (ignore)",
                             choices=["obey", "ignore"])
    per_host_connections: int = option(4, "requests in flight to one host at most, per worker process", bounds="[1, 1024]", output=False)
    per_host_rate: float | None = option(None, "requests a second to one host at most, per worker process; unset, a host is slowed only when it answers 429",
                                         bounds="[0.01, inf)", output=False)
    max_retry_after: float = option(60, "longest wait a 429/503 Retry-After header gets before the host's next request, in seconds",
                                    bounds="[0, 86400]", output=False)

    def check(self) -> None:
        """The quality's range depends on the format."""
        if self.encode_format == "png" and self.encode_quality is not None and self.encode_quality > 9:
            raise OptionError("encode_quality", "a PNG compression level 0-9 with --encode-format png")

    @property
    def quality(self) -> int:
        """The encode quality, with the format's default when none was given."""
        if self.encode_quality is not None:
            return self.encode_quality
        return 3 if self.encode_format == "png" else 95


@dataclass
class AdoptConfig(StageOptions):
    """Options of `dallekit adopt`."""

    format: str = option("auto", "img2dataset's --output_format of the folder (auto: from the files beside each shard)",
                         choices=["auto", "parquet", "webdataset", "files"])
    max_image_bytes: int = option(20 * 2**20, "an image file larger than this is not read: its row is kept as failed", bounds="[1, inf)")
    max_image_area: float = option(64e6, "an image whose header gives more pixels than this is kept as failed_to_resize, as download does",
                                   bounds="(0, inf)")


@dataclass
class ExportConfig:
    """Options of `dallekit export`."""

    format: str = option("webdataset", "what to write: WebDataset tars of key.jpg, key.txt and key.json", choices=["webdataset"])


def _hint(annotation: Any) -> Any:
    """A field annotation as a type, without its `| None`."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is not list and len(args) == 1 else hint


def _base_type(annotation: Any) -> Any:
    """The scalar type of a field annotation such as 'int | None', 'list[str]' or 'list[int] | None'."""
    hint = _hint(annotation)
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_hint(annotation)) is list


def flag_name(name: str) -> str:
    """The command-line flag of a field: --image-size, or -n for one-letter names."""
    return ("-" if len(name) == 1 else "--") + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --option per dataclass field; unset options stay absent so TOML values can fill them."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"] + f" (default: {default})"
        extra = dict(f.metadata["argparse"])
        if f.metadata["choices"]:
            extra["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), type=kind, default=argparse.SUPPRESS, help=help_text, **extra)


def load_toml(path: str | None) -> dict:
    """Read a TOML config file; a missing or malformed file is bad input."""
    if not path:
        return {}
    if Path(path).exists() and not Path(path).is_file():  # a folder, a FIFO or a device would hang or fail to read
        raise BadInputError(f"{path}: not a regular file, expected a TOML file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not valid TOML ({err})") from None
    return resolve_section_aliases(parse_toml(text, path), path)


def parse_toml(text: str, where: str) -> dict:
    """TOML text as a dict (tomllib, or tomli on Python 3.10); malformed TOML is bad input naming `where`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BadInputError(f"{where}: not valid TOML ({err})") from None


def check_sections(toml: dict, where: str, allowed: list[str]) -> None:
    """Every section of a TOML file must be one the command (or `dallekit run`) accepts, and a table."""
    for name, value in toml.items():
        if name not in allowed:
            raise BadInputError(f"{where}: unknown section [{name}] (expected: {', '.join(allowed)})")
        if not isinstance(value, dict):
            raise BadInputError(f"{where}: {name} must be a [{name}] table")


SECTION_ALIASES = {"train-dvae": "train-tokenizer"}  # the names of sections before the FSQ tokenizer, still read


def resolve_section_aliases(toml: dict, where: str) -> dict:
    """The TOML with aliased sections under their current names; bad input when a file has both."""
    out = dict(toml)
    for alias, name in SECTION_ALIASES.items():
        if alias in out:
            if name in out:
                raise BadInputError(f"{where}: [{alias}] and [{name}] are the same section; keep one")
            out[name] = out.pop(alias)
    return out


def _toml_value(value: Any, f: dataclasses.Field, where: str, key: str) -> Any:
    """A TOML value checked against the field's type: TOML skips argparse, so its types are checked here."""
    kind, is_list = _base_type(f.type), _is_list(f.type)
    if is_list:
        values = [value] if isinstance(value, str) else value  # a lone string is a one-element list
        if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
            raise BadInputError(f"{where}: {key} = {value!r}: expected a list of {kind.__name__}")
        return list(values)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise BadInputError(f"{where}: {key} = {value!r}: expected {kind.__name__}")
    return value


def build_config(config_class: type, args: argparse.Namespace, section: dict | None = None, where: str = "config"):
    """Build a config from a TOML section, then override with the options given on the command line; check every value."""
    if section is not None and not isinstance(section, dict):
        raise BadInputError(f"{where}: expected a table of options, got {section!r}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    values, origin = {}, {}
    for key, value in (section or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            raise BadInputError(f"{where}: unknown key '{key}' (expected one of: {', '.join(sorted(fields))})")
        values[name] = _toml_value(value, fields[name], where, key)
        origin[name] = f"{where}: {key} ="
    for name in fields:
        if hasattr(args, name):
            values[name] = getattr(args, name)
            origin[name] = flag_name(name)
    config = config_class(**values)
    check_config(config, lambda name: origin.get(name, f"{where}: {name} ="))
    return config


def _range_text(ge, gt, le, lt) -> str:
    parts = [f">= {ge:g}" if ge is not None else None, f"> {gt:g}" if gt is not None else None,
             f"<= {le:g}" if le is not None else None, f"< {lt:g}" if lt is not None else None]
    return " and ".join(p for p in parts if p)


def _item_problem(f: dataclasses.Field, item: Any) -> str | None:
    """What is wrong with one value of an option, or None.

    Infinity is refused unless the option's default is infinite (no limit), and an empty
    string is never a value: both passed range checks and then broke a stage.
    """
    meta = f.metadata
    if meta.get("choices") and item not in meta["choices"]:
        return "one of " + ", ".join(str(c) for c in meta["choices"] if c is not None)
    if isinstance(item, str):
        if not item.strip():
            return "a non-empty value"
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], item):
            return f"a value matching {meta['pattern']}"
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        ge, gt, le, lt = meta.get("range", (None,) * 4)
        default = f.default if f.default is not dataclasses.MISSING else None
        if math.isinf(item) and not (isinstance(default, float) and math.isinf(default) and item > 0):
            return "a finite number" + (f" {_range_text(ge, gt, le, lt)}" if any(v is not None for v in (ge, gt, le, lt)) else "")
        bad = math.isnan(item) or (ge is not None and item < ge) or (gt is not None and item <= gt)
        if bad or (le is not None and item > le) or (lt is not None and item >= lt):
            return f"a number {_range_text(ge, gt, le, lt)}"
    return None


def check_config(config: Any, describe=None) -> None:
    """Check every option's range, choices and pattern, then the config's own `check()`; bad input names the option."""
    describe = describe or flag_name
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list) and not value and f.metadata.get("argparse", {}).get("nargs") == "+":
            raise BadInputError(f"{describe(f.name)} []: expected at least one value")
        for item in value if isinstance(value, list) else [value]:
            problem = None if item is None else _item_problem(f, item)
            if problem:
                raise BadInputError(f"{describe(f.name)} {item!r}: expected {problem}")
    if hasattr(config, "check"):
        try:
            config.check()
        except OptionError as err:
            value = err.value if err.value is not None else getattr(config, err.name)
            raise BadInputError(f"{describe(err.name)} {value!r}: expected {err.expected}") from None


@dataclass
class CleanConfig(StageOptions):
    """Options of `dallekit clean`."""

    near_dup_distance: int = option(4, "reject images within this many pHash bits of a kept image (-1: no near-dup check)", bounds="[-1, 16]")
    near_dup_color_distance: float = option(
        6.0, "a pHash match is a near duplicate only if the two images' 8x8 RGB thumbnails also differ by at most this "
        "(mean absolute difference per channel value, 0-255; measured: re-encoded copies of 64-256 px pictures <= 5.6, recoloured variants mostly > 6)",
        bounds="[0, 255]",
    )
    near_dup_detail_distance: float = option(
        6.0, "and only if their 32x32 RGB thumbnails, aligned for a slight crop or shift, differ by at most this in every 4x4 block of "
        "their 16x16 reductions (mean absolute difference per channel value, 0-255; measured on emoji: resized and re-encoded copies "
        "mostly <= 6, different pictures with the same pHash and colours (flags, faces, skin tones) 99.5% > 6)",
        bounds="[0, 255]",
    )
    lowercase: bool = option(False, "lowercase the cleaned captions")
    max_caption_chars: int = option(2000, "reject longer cleaned captions as caption_too_long", bounds="[1, inf)")


def language_codes() -> list[str]:
    """The ISO 639-1 codes the language identifier knows."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return list(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)


@dataclass
class FilterConfig(StageOptions):
    """Options of `dallekit filter`: one threshold per rule, checked in this order."""

    min_side: int = option(256, "shorter side of the source image at least this (the dVAE's input)", bounds="[0, inf)")
    max_aspect: float = option(2.0, "long/short side of the source image at most this (DALL-E kept [1/2, 2])", bounds="[1, inf)")
    min_caption_words: int = option(3, "caption words at least this (DataComp: more than 2)", bounds="[0, inf)")
    min_caption_chars: int = option(5, "caption characters at least this (DataComp: more than 5)", bounds="[0, inf)")
    max_caption_tokens: int = option(256, "CLIP BPE tokens of the caption at most this (DALL-E's text length)", bounds="[1, inf)")
    languages: list[str] = option(["en"], "caption languages to keep (py3langid's ISO 639 codes, or 'any'); a caption is rejected only when it is identified, as another language, with at least --min-lang-score", nargs="+")
    # 0.5: short English names (emoji names) keep 99.4% of rows, 12-word non-English UDHR text is
    # still 93% rejected; at 0 (every guess decides) only 43% of those names were kept (benchmarks/language_rule.py)
    min_lang_score: float = option(0.5, "reject another language only when the identifier's probability for it is at least this; unsurer guesses keep the row (counted as lang_kept.uncertain)", bounds="[0, 1]")
    # below 10 letters py3langid named English emoji names right 4-23% of the time, Latin-script CLDR names of other languages 18-49%
    min_lang_letters: int = option(10, "captions with fewer letters are not identified: kept, with lang 'unknown' (counted as lang_kept.unknown)", bounds="[0, inf)")
    max_punsafe: float = option(0.5, "LAION punsafe at most this, when the column is present", bounds="[0, 1]")
    max_pwatermark: float = option(0.8, "LAION pwatermark at most this, when the column is present", bounds="[0, 1]")
    clip: bool = option(True, "score image-caption pairs with CLIP (--no-clip skips it)")
    clip_model: str = option("ViT-B-32", "open_clip model name")
    clip_pretrained: str | None = option("laion2b_s34b_b79k", "open_clip pretrained tag (weights come from a hub)")
    clip_checkpoint: str | None = option(None, "local CLIP: an open_clip folder (open_clip_config.json + .safetensors) or a .safetensors file for --clip-model")
    clip_threshold: float = option(0.28, "keep CLIP cosine similarity at least this (LAION English)", bounds="[-1, 1]")
    clip_top_fraction: float | None = option(None, "instead of the threshold, keep this fraction with the best CLIP scores, over the whole dataset", bounds="(0, 1]")
    clip_batch_size: int = option(64, "images per CLIP forward pass", bounds="[1, inf)", output=False)
    device: str = option("auto", "torch device for CLIP (auto: cuda when there is one)", pattern=DEVICE, output=False)
    # not an output option by its path: the fingerprint records the folder by content instead (a moved folder is the same input)
    embeddings: str | None = option(None, "a `dallekit embed` folder of this input, made with this CLIP: the CLIP score is read from it, no image is decoded", output=False)
    # Semantic dedup (SemDeDup, Abbas et al. 2023) over the --embeddings' image vectors, among the rows every other rule keeps
    semantic_dedup_eps: float | None = option(None, "reject a row as semantic_duplicate when a row its k-means cluster keeps first has image cosine > 1 - this (SemDeDup's eps; off by default)", bounds="(0, 1)")
    semantic_dedup_clusters: int | None = option(None, "k-means clusters (default: the eligible rows / 2,000)", bounds="[1, inf)")
    semantic_dedup_keep: str = option("centroid", "which row of a near-duplicate group is kept: the one nearest its cluster's centroid (SemDeDup's) or the best CLIP score", choices=["centroid", "clip_score"])
    semantic_dedup_sample: int = option(100_000, "rows k-means trains on, at most (drawn from a spread of shards)", bounds="[1, inf)")

    def check(self) -> None:
        """Language codes must be ones the identifier can answer (that the semantic dedup has --embeddings is the plan's check: `dallekit run` gives them)."""
        known = set(language_codes()) | {"any"}
        for code in self.languages:
            if code.lower() not in known:
                raise OptionError("languages", "an ISO 639-1 code the language identifier knows (such as en, de, fr) or 'any'", code)


@dataclass
class EmbedConfig(StageOptions):
    """Options of `dallekit embed`: the CLIP (the same options and defaults as filter's) and how it runs."""

    clip_model: str = option("ViT-B-32", "open_clip model name")
    clip_pretrained: str | None = option("laion2b_s34b_b79k", "open_clip pretrained tag (weights come from a hub)")
    clip_checkpoint: str | None = option(None, "local CLIP: an open_clip folder (open_clip_config.json + .safetensors) or a .safetensors file for --clip-model")
    batch_size: int = option(64, "images per CLIP forward pass", bounds="[1, inf)", output=False)
    device: str = option("auto", "torch device for CLIP (auto: cuda when there is one)", pattern=DEVICE, output=False)


DVAE_PRESET_NAMES = ["tiny", "small", "dalle"]  # models.dvae.DVAE_PRESETS (config sits below models: names only)
FSQ_PRESET_NAMES = ["fsq-tiny", "fsq-tiny-240", "fsq-small", "fsq-base"]  # models.fsq.FSQ_PRESETS
FSQ_ONLY_OPTIONS = ("levels", "image_size", "ema_decay", "disc_start", "disc_weight", "perceptual_weights", "discriminator_init", "hflip")


@dataclass
class TrainTokenizerConfig:
    """Options of `dallekit train-tokenizer` (alias `train-dvae`): the preset picks the kind, dVAE or FSQ, its architecture and schedule."""

    preset: str = option("tiny", "tokenizer preset: a dVAE (tiny, small, dalle) or an FSQ autoencoder (fsq-tiny, fsq-tiny-240, fsq-small, fsq-base)",
                         choices=DVAE_PRESET_NAMES + FSQ_PRESET_NAMES)
    max_steps: int | None = option(None, "training steps (default: the preset's)", bounds="[1, inf)")
    batch_size: int | None = option(None, "images per step (default: the preset's)", bounds="[1, inf)")
    recon_loss: str | None = option(None, "dVAE reconstruction loss (default: the preset's)", choices=[None, "logit_laplace", "mse"])
    levels: list[int] | None = option(None, "FSQ levels per latent channel, e.g. 8 5 5 5 (1,000 codes; default: the preset's)", nargs="+")
    image_size: int | None = option(None, "FSQ input side in pixels, a multiple of 4 from 12 (the discriminator's smallest input) "
                                    "to 1024 (default: the preset's)", bounds="[12, 1024]")
    ema_decay: float | None = option(None, "FSQ: decay of the weights' moving average used for evaluation and the saved model (0: none; default: the preset's)", bounds="[0, 1)")
    disc_start: int | None = option(None, "FSQ: step at which the PatchGAN loss starts (default: the preset's share of max_steps)", bounds="[0, inf)")
    disc_weight: float | None = option(None, "FSQ: weight of the PatchGAN generator loss (0: none; default: the preset's)", bounds="[0, inf)")
    perceptual_weights: str | None = option(None, "FSQ: a local .safetensors of VGG16 features (and optional LPIPS heads) for a perceptual loss; never downloaded")
    discriminator_init: str | None = option(None, "FSQ: a local .safetensors of discriminator weights to start from")
    hflip: bool = option(False, "FSQ: mirror half the training images (off by default: a caption can say left or right)")
    seed: int = option(0, "seed of weights, data order and Gumbel noise")
    resume: bool = option(False, "continue from the output folder's checkpoint")
    checkpoint_every: int = option(250, "steps between checkpoints, evaluations and reconstruction grids", bounds="[1, inf)")
    log_every: int = option(25, "steps between metric lines", bounds="[1, inf)")
    val_percent: int = option(5, "percent of images (chosen by uid) held out for PSNR and codebook usage", bounds="[1, 50]")
    shuffle_buffer: int = option(4096, "images in the shuffle buffer", bounds="[1, inf)")
    device: str = option("auto", "torch device (auto: cuda when there is one)", pattern=DEVICE)
    dtype: str = option("bf16", "autocast dtype: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp32"])

    def check(self) -> None:
        """FSQ options need an FSQ preset; levels must make 2 to 65,535 codes of at least 2 values each."""
        if self.preset in DVAE_PRESET_NAMES:
            for name in FSQ_ONLY_OPTIONS:
                if getattr(self, name) is not None and getattr(self, name) is not False:  # set (0 included): the dVAE trainer would ignore it
                    raise OptionError(name, f"an FSQ preset ({', '.join(FSQ_PRESET_NAMES)}) to apply to; {self.preset} is a dVAE", getattr(self, name))
            return
        if self.recon_loss is not None:
            raise OptionError("recon_loss", "a dVAE preset (the FSQ tokenizer's loss is L2 plus its GAN and perceptual terms)", self.recon_loss)
        if self.levels is not None:
            if not self.levels or any(level < 2 for level in self.levels):
                raise OptionError("levels", "whole numbers of at least 2 (the paper's: 8 6 5, 8 5 5 5, 7 5 5 5 5)", self.levels)
            if math.prod(self.levels) > 65535:
                raise OptionError("levels", f"at most 65535 codes in all (uint16 tokens); {' x '.join(map(str, self.levels))} = {math.prod(self.levels)}", self.levels)
        if self.image_size is not None and self.image_size % 4:
            raise OptionError("image_size", "a multiple of 4 (the FSQ presets halve it twice to the token grid)", self.image_size)


TrainDVAEConfig = TrainTokenizerConfig  # the name before FSQ: Python callers of train_dvae keep working


@dataclass
class EncodeConfig(StageOptions):
    """Options of `dallekit encode`."""

    text_tokenizer: str = option("clip-bpe", "'clip-bpe' (CLIP's BPE) or the folder of a `dallekit train-bpe` tokenizer")
    batch_size: int = option(64, "images per dVAE forward pass", bounds="[1, inf)", output=False)
    keep_columns: list[str] = option(["clip_score", "width", "height"], "columns passed through when present", nargs="*")
    hflip: bool = option(False, "also write `image_tokens_hflip`, the codes of the mirrored image, for `train --hflip`")
    device: str = option("auto", "torch device for the dVAE (auto: cuda when there is one)", pattern=DEVICE, output=False)

    def check(self) -> None:
        """A kept column must not be one encode writes itself, nor be named twice."""
        for i, name in enumerate(self.keep_columns):
            if name in ("uid", "caption", "text_tokens", "image_tokens", "image_tokens_hflip", "jpg") or name in self.keep_columns[:i]:
                raise OptionError("keep_columns", "columns other than uid, caption, text_tokens, image_tokens(_hflip) and jpg, each once", name)


@dataclass
class TrainConfig:
    """Options of `dallekit train` (the transformer's size comes from the preset)."""

    preset: str = option("tiny", "transformer preset", choices=["tiny", "small", "base"])
    max_steps: int = option(2000, "optimizer steps", bounds="[1, inf)")
    batch_size: int = option(32, "samples per micro-batch (per rank)", bounds="[1, inf)")
    grad_accum: int = option(1, "micro-batches per optimizer step", bounds="[1, inf)")
    lr: float = option(1e-3, "peak learning rate (after warm-up)", bounds="(0, inf)")
    min_lr: float = option(1e-4, "learning rate at max_steps (cosine decay)", bounds="[0, inf)")
    warmup_steps: int = option(100, "linear warm-up steps", bounds="[0, inf)")
    weight_decay: float = option(4.5e-2, "AdamW weight decay (DALL-E: 4.5e-2)", bounds="[0, inf)")
    beta2: float = option(0.96, "AdamW beta2 (DALL-E: 0.96)", bounds="(0, 1)")
    grad_clip: float = option(4.0, "gradient norm clip (DALL-E: 4)", bounds="(0, inf)")
    text_len: int | None = option(None, "text positions (default: the preset's)", bounds="[1, inf)")
    p_uncond: float = option(0.1, "caption dropout probability, for classifier-free guidance", bounds="[0, 1)")
    dropout: float = option(0.0, "dropout in attention and MLP outputs (nanoGPT: 0 for large data, 0.1+ for small)", bounds="[0, 1)")
    sparse_attention: bool = option(False, "DALL-E's row/column/conv attention masks on image tokens")
    attention_window: int = option(0, "image tokens attend to earlier ones at most this many rows/columns away in all layers but the last (0: full)", bounds="[0, inf)")
    seed: int = option(0, "seed of weights, data order and caption dropout")
    resume: bool = option(False, "continue from the output folder's checkpoint")
    checkpoint_every: int = option(500, "steps between checkpoints and validation", bounds="[1, inf)")
    checkpoint_samples: int = option(4, "held-out captions sampled (2 images each) at every checkpoint into checkpoint_samples.jsonl (0: none)", bounds="[0, inf)")
    log_every: int = option(25, "steps between metric lines", bounds="[1, inf)")
    val: str | None = option(None, "a folder of held-out token shards (else --val-fraction of the shards)")
    val_fraction: float = option(0.05, "fraction of shards held out for validation loss (0: none)", bounds="[0, 1)")
    val_batches: int = option(20, "batches per validation pass", bounds="[1, inf)")
    num_workers: int = option(2, "loader worker processes (0: load in the training process)", bounds="[0, inf)")
    shuffle_buffer: int = option(4096, "rows in the loader's shuffle buffer", bounds="[1, inf)")
    device: str = option("auto", "torch device (auto: cuda when there is one)", pattern=DEVICE)
    compile: bool = option(False, "torch.compile the model")
    dtype: str = option("bf16", "autocast dtype: bf16 or fp16 (with loss scaling) on a GPU; bf16 also on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp16", "fp32"])
    tensorboard: bool = option(False, "also write metrics for TensorBoard to OUT/tensorboard (needs the tensorboard package)")
    peak_flops: float | None = option(None, "peak FLOP/s for MFU (default: known GPUs' bf16 peak; none on CPU)", bounds="(0, inf)")
    deterministic: bool = option(False, "deterministic kernels (for exact-resume checks)")
    ema_decay: float = option(0.999, "decay of the weights' moving average, which validation, checkpoint samples and the published model use (0: off)", bounds="[0, 1)")
    early_stop: int = option(0, "stop when the validation image loss has not improved for this many evaluations (0: never)", bounds="[0, inf)")
    hflip: bool = option(False, "train on the mirrored image's codes (`image_tokens_hflip`, from `encode --hflip`) for half the rows, at random")


@dataclass
class TrainClipConfig:
    """Options of `dallekit train-clip`."""

    model: str = option("dallekit-tiny-clip", "open_clip model name (dallekit's small configs are registered)")
    max_steps: int = option(300, "optimizer steps", bounds="[1, inf)")
    batch_size: int = option(64, "pairs per step (contrastive negatives come from the batch)", bounds="[2, inf)")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to 1/10)", bounds="(0, inf)")
    weight_decay: float = option(0.1, "AdamW weight decay", bounds="[0, inf)")
    seed: int = option(0, "seed of weights and data order")
    device: str = option("auto", "torch device (auto: cuda when there is one)", pattern=DEVICE)
    dtype: str = option("bf16", "autocast dtype: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp32"])


@dataclass
class ClipOptions:
    """The CLIP that reranks or scores: a local checkpoint, or a model name with a pretrained tag."""

    clip_checkpoint: str | None = option(None, "a local open_clip folder or .safetensors (e.g. from train-clip)")
    clip_model: str = option("ViT-B-32", "open_clip model name for --clip-pretrained or a .safetensors checkpoint")
    clip_pretrained: str | None = option(None, "open_clip pretrained tag (weights from the hub)")


@dataclass
class SampleConfig:
    """Options of `dallekit sample` (and the [sample] section of a pipeline config)."""

    prompts: list[str] = option([], "prompts to generate for (in a pipeline config; the CLI takes --prompt and --prompts FILE)", nargs="*")
    n: int = option(16, "candidates per prompt (DALL-E used 512)", bounds="[1, 100_000]")
    keep: int = option(4, "best candidates kept per prompt", bounds="[1, inf)")
    batch_size: int = option(16, "candidates generated at once", bounds="[1, 4096]")
    temperature: float = option(1.0, "sampling temperature", bounds="[0.01, 100]")
    top_k: int | None = option(None, "sample among the k likeliest image tokens", bounds="[1, inf)")
    top_p: float | None = option(None, "sample from the smallest set of tokens with this probability mass", bounds="(0, 1]")
    cond_scale: float = option(1.0, "classifier-free guidance scale (1: none; > 1 needs caption dropout in training)", bounds="[0, 100]")
    seed: int = option(0, "seed of the candidates (a run with the same seed is identical)")

    def check(self) -> None:
        """Keeping more candidates than are made is a mistake."""
        if self.keep > self.n:
            raise OptionError("keep", f"at most -n ({self.n})")


@dataclass
class EvaluateConfig:
    """Options of `dallekit evaluate`."""

    n: int = option(16, "candidates per caption; the CLIP curve goes 1, 2, 4, ... n", bounds="[1, 100_000]")
    captions: int = option(16, "held-out captions to generate for", bounds="[1, 100_000]")
    seed: int = option(0, "seed of the candidates")
    batch_size: int = option(16, "candidates generated at once, and the validation loss's batch", bounds="[1, 4096]")
    val_batches: int = option(20, "batches of the held-out shards the validation loss averages", bounds="[1, inf)")


@dataclass
class DecodeConfig:
    """Options of `dallekit decode`."""

    limit: int = option(64, "rows to decode", bounds="[1, inf)")


@dataclass
class IndexConfig:
    """Options of `dallekit index`."""

    max_memory: str = option("4GB", "memory the index may take when searched (4GB, 512MB, 2GiB): exact search when it fits "
                             "and the folder is small, else HNSW, else IVF-PQ with the largest code that fits")
    kind: str = option("auto", "the index: auto (chosen for --max-memory), flat (exact), hnsw or ivfpq", choices=["auto", "flat", "hnsw", "ivfpq"])
    overwrite: bool = option(False, "rebuild when --out holds an index of other embeddings or options")

    def check(self) -> None:
        """The budget must read as a size."""
        if memory_bytes(self.max_memory) is None:
            raise OptionError("max_memory", "a size such as 4GB, 512MB or 2GiB")


@dataclass
class SearchConfig:
    """Options of `dallekit search`."""

    k: int = option(16, "hits to show", bounds="[1, inf)")
    image: str | None = option(None, "search by this image file instead of a text (its size is read from its header before decoding)")
    grid: str = option("search.png", "PNG file for the grid of hits, each with its score and caption (in the current folder by default)")
    clip_model: str | None = option(None, "the CLIP to embed the query (default: the index's; must be the model of its embeddings)")
    clip_pretrained: str | None = option(None, "its pretrained tag (default: the index's)")
    clip_checkpoint: str | None = option(None, "a local open_clip folder or .safetensors (default: the index's)")
    device: str = option("auto", "torch device for CLIP (auto: cuda when there is one)", pattern=DEVICE)


@dataclass
class TrainBPEConfig:
    """Options of `dallekit train-bpe`."""

    vocab_size: int = option(16384, "vocabulary size (DALL-E's: 16384)", bounds="[260, 65536]")


@dataclass
class DemoOptions:
    """Options of `dallekit demo`."""

    out: str = option("runs/demo", "run folder")
    quick: bool = option(False, "a small, fast run (for tests)")
    samples: int | None = option(None, "number of generated pairs (default 6000, or 300 with --quick)", bounds="[10, inf)")
    seed: int = option(0, "seed of the generated set")


RUN_STEPS = ["ingest", "download", "clean", "train-clip", "embed", "filter", "train-tokenizer", "train-bpe", "encode", "train", "sample", "evaluate", "report"]


@dataclass
class RunConfig:
    """The [run] section of `dallekit run`: the run folder, its inputs and which steps run."""

    out: str = option("runs/pipeline", "run folder: one sub-folder per step, then report.html")
    inputs: list[str] = option([], "URL lists for ingest: files, globs, folders or fsspec URLs", nargs="+")
    dvae: str | None = option(None, "an existing image tokenizer folder (dVAE or FSQ) to encode with (train-tokenizer is skipped)")
    bpe_vocab_size: int | None = option(None, "train a BPE of this size on the filtered captions and encode with it (else [encode] text_tokenizer)", bounds="[260, 65536]")
    train_clip: bool = option(False, "train a CLIP ([train-clip]) on the cleaned pairs; embed, filter, sample and evaluate then use it instead of [filter]'s")
    stop_after: str = option("report", "last step to run (train-dvae: the old name of train-tokenizer)", choices=RUN_STEPS + ["train-dvae"])


# The sections `dallekit run` reads: one per step, plus [run] and [cluster].
RUN_SECTION_NAMES = ["run", "cluster", "ingest", "download", "clean", "embed", "filter", "train-tokenizer", "encode", "train", "train-clip",
                     "sample", "evaluate"]
# The sections a --config TOML file of a single command may hold: the run's and the other commands'.
SECTION_NAMES = RUN_SECTION_NAMES + ["adopt", "decode", "train-bpe", "export", "index", "search"]
