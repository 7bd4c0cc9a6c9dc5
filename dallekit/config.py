"""Dataclass configs: one per stage, each option usable from the CLI and from a TOML file.

A field's metadata carries its help text; `add_options` turns the fields into argparse options
and `build_config` merges a TOML section with the options given on the command line (the
command line wins). There is no other config system.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BadInputError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field with CLI help text (and optional extra argparse keywords)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class ClusterConfig:
    """Where the Dask tasks run."""

    scheduler: str | None = option(None, "address of an existing Dask scheduler (else DASK_SCHEDULER_ADDRESS, else a LocalCluster)")
    workers: int | None = option(None, "worker processes of the local cluster (default: one per core)")
    threads_per_worker: int = option(1, "threads per local worker process")
    processes: bool = option(True, "local workers as processes (--no-processes: threads in this process, for debugging)")


@dataclass
class IngestConfig:
    """Options of `dallekit ingest`."""

    format: str = option("auto", "input format", choices=["auto", "cc3m", "laion", "csv", "tsv", "jsonl", "parquet", "folder"])
    url_col: str | None = option(None, "URL column (default: url, or URL for LAION)")
    caption_col: str | None = option(None, "caption column (default: caption, or TEXT for LAION)")
    shard_size: int = option(10000, "input rows per output shard")
    allow_file_urls: bool = option(False, "accept file:// URLs in tabular inputs (always allowed for --format folder)")
    block_bytes: int = option(64 * 2**20, "bytes of a text input read by one task")


@dataclass
class DownloadConfig:
    """Options of `dallekit download`; names and defaults follow img2dataset's."""

    image_size: int = option(256, "side of the resized image in pixels")
    resize_mode: str = option("center_crop", "img2dataset resize mode", choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"])
    resize_only_if_bigger: bool = option(False, "only downscale, never upscale")
    threads: int = option(256, "download threads per shard task (img2dataset's thread_count)")
    timeout: float = option(10, "seconds before a download is abandoned")
    retries: int = option(0, "extra download attempts per URL")
    encode_format: str = option("jpg", "format of the stored image bytes", choices=["jpg", "png", "webp"])
    encode_quality: int = option(95, "JPEG/WEBP quality, or PNG compression 0-9")
    min_image_size: int = option(0, "reject images whose shorter side is below this (pixels)")
    max_image_area: float = option(math.inf, "reject images with more pixels than this")
    max_aspect_ratio: float = option(math.inf, "reject images whose long/short side ratio exceeds this")
    extract_exif: bool = option(True, "keep EXIF as a JSON string column")
    compute_hash: str = option("sha256", "hash of the raw downloaded bytes, kept as a column")
    user_agent_token: str | None = option(None, "token added to the User-Agent and matched in X-Robots-Tag")
    disallowed_header_directives: list[str] = option(
        ["noai", "noimageai", "noindex", "noimageindex"],
        "X-Robots-Tag directives that opt an image out ('none' to honour none)",
        nargs="+",
    )


def _base_type(annotation: Any) -> Any:
    """The scalar type of a field annotation such as 'int | None' or 'list[str]'."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return args[0]
    return args[0] if args else hint


def add_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one --option per dataclass field; unset options stay absent so TOML values can fill them."""
    for f in dataclasses.fields(config_class):
        kind = _base_type(f.type)
        flag = ("-" if len(f.name) == 1 else "--") + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, **meta)


def load_toml(path: str | None) -> dict:
    """Read a TOML config file; a missing or malformed file is bad input."""
    if not path:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: not valid TOML ({err})") from None


def build_config(config_class: type, args: argparse.Namespace, section: dict | None = None, where: str = "config"):
    """Build a config from a TOML section, then override with the options given on the command line."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {}
    for key, value in (section or {}).items():
        name = key.replace("-", "_")
        if name not in names:
            raise BadInputError(f"{where}: unknown key '{key}' (expected one of: {', '.join(sorted(names))})")
        values[name] = value
    for name in names:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    config = config_class(**values)
    _check_choices(config, where)
    return config


def _check_choices(config: Any, where: str) -> None:
    """TOML values skip argparse's checks, so check choices and types here too."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise BadInputError(f"{where}: {f.name} = {value!r} is not one of {', '.join(choices)}")
        kind = _base_type(f.type)
        if value is None or kind is str or isinstance(value, list):
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadInputError(f"{where}: {f.name} = {value!r}: expected {kind.__name__}")


@dataclass
class CleanConfig:
    """Options of `dallekit clean`."""

    near_dup_distance: int = option(4, "reject images within this many pHash bits of a kept image (-1: no near-dup check)")
    lowercase: bool = option(False, "lowercase the cleaned captions")
    max_caption_chars: int = option(2000, "reject longer cleaned captions as caption_too_long")


@dataclass
class FilterConfig:
    """Options of `dallekit filter`: one threshold per rule, checked in this order."""

    min_side: int = option(256, "shorter side of the source image at least this (the dVAE's input)")
    max_aspect: float = option(2.0, "long/short side of the source image at most this (DALL-E kept [1/2, 2])")
    min_caption_words: int = option(3, "caption words at least this (DataComp: more than 2)")
    min_caption_chars: int = option(5, "caption characters at least this (DataComp: more than 5)")
    max_caption_tokens: int = option(256, "CLIP BPE tokens of the caption at most this (DALL-E's text length)")
    languages: list[str] = option(["en"], "caption languages to keep (ISO 639-1 codes, or 'any')", nargs="+")
    min_lang_score: float = option(0.0, "language-ID probability at least this")
    max_punsafe: float = option(0.5, "LAION punsafe at most this, when the column is present")
    max_pwatermark: float = option(0.8, "LAION pwatermark at most this, when the column is present")
    clip: bool = option(True, "score image-caption pairs with CLIP (--no-clip skips it)")
    clip_model: str = option("ViT-B-32", "open_clip model name")
    clip_pretrained: str | None = option("laion2b_s34b_b79k", "open_clip pretrained tag (weights come from a hub)")
    clip_checkpoint: str | None = option(None, "local CLIP: an open_clip folder (open_clip_config.json + .safetensors) or a .safetensors file for --clip-model")
    clip_threshold: float = option(0.28, "keep CLIP cosine similarity at least this (LAION English)")
    clip_top_fraction: float | None = option(None, "instead of the threshold, keep this fraction with the best CLIP scores, over the whole dataset")
    clip_batch_size: int = option(64, "images per CLIP forward pass")
    device: str = option("auto", "torch device for CLIP (auto: cuda when there is one)")


@dataclass
class TrainDVAEConfig:
    """Options of `dallekit train-dvae` (the architecture and schedule come from the preset)."""

    preset: str = option("tiny", "dVAE preset", choices=["tiny", "small", "dalle"])
    max_steps: int | None = option(None, "training steps (default: the preset's)")
    batch_size: int | None = option(None, "images per step (default: the preset's)")
    recon_loss: str | None = option(None, "reconstruction loss (default: the preset's)", choices=[None, "logit_laplace", "mse"])
    seed: int = option(0, "seed of weights, data order and Gumbel noise")
    resume: bool = option(False, "continue from the output folder's checkpoint")
    checkpoint_every: int = option(250, "steps between checkpoints, evaluations and reconstruction grids")
    log_every: int = option(25, "steps between metric lines")
    val_percent: int = option(5, "percent of images (chosen by uid) held out for PSNR and codebook usage")
    shuffle_buffer: int = option(4096, "images in the shuffle buffer")
    device: str = option("auto", "torch device (auto: cuda when there is one)")
    dtype: str = option("bf16", "autocast dtype: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp32"])


@dataclass
class EncodeConfig:
    """Options of `dallekit encode`."""

    text_tokenizer: str = option("clip-bpe", "'clip-bpe' (CLIP's BPE) or the folder of a `dallekit train-bpe` tokenizer")
    batch_size: int = option(64, "images per dVAE forward pass")
    keep_columns: list[str] = option(["clip_score", "width", "height"], "columns passed through when present", nargs="*")
    device: str = option("auto", "torch device for the dVAE (auto: cuda when there is one)")


@dataclass
class TrainConfig:
    """Options of `dallekit train` (the transformer's size comes from the preset)."""

    preset: str = option("tiny", "transformer preset", choices=["tiny", "small", "base"])
    max_steps: int = option(2000, "optimizer steps")
    batch_size: int = option(32, "samples per micro-batch (per rank)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate (after warm-up)")
    min_lr: float = option(1e-4, "learning rate at max_steps (cosine decay)")
    warmup_steps: int = option(100, "linear warm-up steps")
    weight_decay: float = option(4.5e-2, "AdamW weight decay (DALL-E: 4.5e-2)")
    beta2: float = option(0.96, "AdamW beta2 (DALL-E: 0.96)")
    grad_clip: float = option(4.0, "gradient norm clip (DALL-E: 4)")
    text_len: int | None = option(None, "text positions (default: the preset's)")
    p_uncond: float = option(0.1, "caption dropout probability, for classifier-free guidance")
    dropout: float = option(0.0, "dropout in attention and MLP outputs (nanoGPT: 0 for large data, 0.1+ for small)")
    sparse_attention: bool = option(False, "DALL-E's row/column/conv attention masks on image tokens")
    attention_window: int = option(0, "image tokens attend to earlier ones at most this many rows/columns away in all layers but the last (0: full)")
    seed: int = option(0, "seed of weights, data order and caption dropout")
    resume: bool = option(False, "continue from the output folder's checkpoint")
    checkpoint_every: int = option(500, "steps between checkpoints and validation")
    checkpoint_samples: int = option(4, "held-out captions sampled (2 images each) at every checkpoint into checkpoint_samples.jsonl (0: none)")
    log_every: int = option(25, "steps between metric lines")
    val: str | None = option(None, "a folder of held-out token shards (else --val-fraction of the shards)")
    val_fraction: float = option(0.05, "fraction of shards held out for validation loss (0: none)")
    val_batches: int = option(20, "batches per validation pass")
    num_workers: int = option(2, "loader worker processes (0: load in the training process)")
    shuffle_buffer: int = option(4096, "rows in the loader's shuffle buffer")
    device: str = option("auto", "torch device (auto: cuda when there is one)")
    compile: bool = option(False, "torch.compile the model")
    dtype: str = option("bf16", "autocast dtype: bf16 or fp16 (with loss scaling) on a GPU; bf16 also on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp16", "fp32"])
    tensorboard: bool = option(False, "also write metrics for TensorBoard to OUT/tensorboard (needs the tensorboard package)")
    peak_flops: float | None = option(None, "peak FLOP/s for MFU (default: known GPUs' bf16 peak; none on CPU)")
    deterministic: bool = option(False, "deterministic kernels (for exact-resume checks)")


@dataclass
class TrainClipConfig:
    """Options of `dallekit train-clip`."""

    model: str = option("dallekit-tiny-clip", "open_clip model name (dallekit's small configs are registered)")
    max_steps: int = option(300, "optimizer steps")
    batch_size: int = option(64, "pairs per step (contrastive negatives come from the batch)")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to 1/10)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    seed: int = option(0, "seed of weights and data order")
    device: str = option("auto", "torch device (auto: cuda when there is one)")
    dtype: str = option("bf16", "autocast dtype: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), fp32 elsewhere", choices=["bf16", "fp32"])


@dataclass
class SampleConfig:
    """Options of `dallekit sample` (and the [sample] section of a pipeline config)."""

    prompts: list[str] = option([], "prompts to generate for (in a pipeline config; the CLI takes --prompt and --prompts FILE)", nargs="*")
    n: int = option(16, "candidates per prompt (DALL-E used 512)")
    keep: int = option(4, "best candidates kept per prompt")
    batch_size: int = option(16, "candidates generated at once")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int | None = option(None, "sample among the k likeliest image tokens")
    top_p: float | None = option(None, "sample from the smallest set of tokens with this probability mass")
    cond_scale: float = option(1.0, "classifier-free guidance scale (1: none; > 1 needs caption dropout in training)")
    seed: int = option(0, "seed of the candidates (a run with the same seed is identical)")


@dataclass
class EvaluateConfig:
    """Options of `dallekit evaluate`."""

    n: int = option(16, "candidates per caption; the CLIP curve goes 1, 2, 4, ... n")
    captions: int = option(16, "held-out captions to generate for")
    seed: int = option(0, "seed of the candidates")


RUN_STEPS = ["ingest", "download", "clean", "train-clip", "filter", "train-dvae", "train-bpe", "encode", "train", "sample", "evaluate", "report"]


@dataclass
class RunConfig:
    """The [run] section of `dallekit run`: the run folder, its inputs and which steps run."""

    out: str = option("runs/pipeline", "run folder: one sub-folder per step, then report.html")
    inputs: list[str] = option([], "URL lists for ingest: files, globs, folders or fsspec URLs", nargs="+")
    dvae: str | None = option(None, "an existing dVAE folder to encode with (train-dvae is skipped)")
    bpe_vocab_size: int | None = option(None, "train a BPE of this size on the filtered captions and encode with it (else [encode] text_tokenizer)")
    train_clip: bool = option(False, "train a CLIP ([train-clip]) on the cleaned pairs; filter, sample and evaluate then use it instead of [filter]'s")
    stop_after: str = option("report", "last step to run", choices=RUN_STEPS)
