"""The `dallekit` command: one subcommand per stage or job.

Every option is declared once, on a config dataclass in `dallekit.config`, so the command line
and a `--config` TOML file share its type, range and choices. Exit codes: 0 done, 2 bad input or
usage (one line on stderr, no traceback), 1 anything else (a bug: with its traceback), 130
interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from dallekit import config as config_module
from dallekit.config import (
    RUN_SECTION_NAMES,
    SECTION_NAMES,
    ClipOptions,
    ClusterConfig,
    DecodeConfig,
    DemoOptions,
    EvaluateConfig,
    ExportConfig,
    IndexConfig,
    RunConfig,
    SampleConfig,
    SearchConfig,
    TrainBPEConfig,
    TrainClipConfig,
    TrainConfig,
    TrainTokenizerConfig,
    add_options,
    build_config,
    check_sections,
    load_toml,
)
from dallekit.errors import BadInputError, environment_error
from dallekit.pipeline.registry import STAGES, StageEntry


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInputError(f"{self.prog}: {message}")


@dataclass
class Command:
    """One subcommand: its positional arguments, its config sections and whether it runs on Dask."""

    name: str
    help: str
    positionals: list[tuple[str, str, str]]  # (dest, nargs or "", help)
    sections: dict[str, type]  # TOML section -> config class; the first is the command's own
    out_help: str | None
    extra: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)  # further argparse arguments
    dask: bool = False  # a Dask stage: the cluster options and a LocalCluster
    out_required: bool = True  # False where another mode needs no --out (download --retry-failed)


def stage_command(entry: StageEntry) -> Command:
    """A Dask stage's subcommand, from its entry of STAGES."""
    config_class = getattr(config_module, entry.config)
    return Command(entry.name, entry.summary, list(entry.inputs), {entry.name: config_class}, f"output folder of {entry.shards} shards",
                   extra=list(entry.extra), dask=True, out_required=entry.out_required)


# Every subcommand: the Dask stages from STAGES (pipeline/registry.py), then the trainers and tools.
COMMANDS = [stage_command(entry) for entry in STAGES.values()] + [
    Command("train-tokenizer", "train an image tokenizer (FSQ autoencoder or discrete VAE, by preset) on the images of filtered shards",
            [("filtered", "", "folder of image shards (from `dallekit filter`)")], {"train-tokenizer": TrainTokenizerConfig},
            "run folder: model.safetensors, config.json, checkpoint/, metrics.jsonl, grids"),
    Command("train-dvae", "the old name of train-tokenizer (same options; its default preset is the tiny dVAE)",
            [("filtered", "", "folder of image shards (from `dallekit filter`)")], {"train-tokenizer": TrainTokenizerConfig},
            "run folder: model.safetensors, config.json, checkpoint/, metrics.jsonl, grids"),
    Command("train-clip", "train a small open_clip model on the kept pairs (an offline reranker and filter)",
            [("filtered", "", "folder of image shards with captions (from `dallekit filter`)")], {"train-clip": TrainClipConfig},
            "open_clip folder: open_clip_config.json + open_clip_model.safetensors"),
    Command("train", "train the DALL-E transformer on token Parquet (torchrun for several GPUs)",
            [("tokens", "", "folder of token shards (from `dallekit encode`)")], {"train": TrainConfig},
            "run folder: model.safetensors, config.json, checkpoint/, metrics.jsonl"),
    Command("sample", "generate images for prompts, rerank with CLIP, keep the best", [], {"sample": SampleConfig, "clip": ClipOptions},
            "folder for PNGs, grids and samples.jsonl",
            extra=[(("--model",), {"required": True, "help": "transformer folder (from `dallekit train`)"}),
                   (("--tokenizer", "--dvae"), {"dest": "dvae", "required": True, "help": "the image tokenizer folder (FSQ or dVAE) its tokens came from"}),
                   (("--prompt",), {"action": "append", "default": [], "help": "a prompt (repeatable)"}),
                   (("--prompts-file", "--prompts"), {"dest": "prompts_file", "help": "a UTF-8 file with one prompt per line"})]),
    Command("evaluate", "validation loss, CLIP reranking effect (and FID when possible) on held-out tokens", [],
            {"evaluate": EvaluateConfig, "clip": ClipOptions}, "folder for eval.json and clip_vs_n.png",
            extra=[(("--model",), {"required": True, "help": "transformer folder"}),
                   (("--tokenizer", "--dvae"), {"dest": "dvae", "required": True, "help": "the image tokenizer folder (FSQ or dVAE) its tokens came from"}),
                   (("--tokens",), {"required": True, "help": "held-out token shards"})]),
    Command("decode", "token rows -> PNGs through the image tokenizer, for inspection",
            [("tokens", "", "folder of token shards")], {"decode": DecodeConfig}, "folder for <uid>.png and grid.png",
            extra=[(("--tokenizer", "--dvae"), {"dest": "dvae", "required": True, "help": "the image tokenizer folder (FSQ or dVAE) that encoded them"})]),
    Command("train-bpe", "train a byte-level BPE text tokenizer on captions",
            [("captions", "", "a stage folder with a caption column, or text files with one caption per line")],
            {"train-bpe": TrainBPEConfig}, "folder for tokenizer.json"),
    Command("export", "a stage folder -> WebDataset tars (uid.jpg, uid.txt, uid.json) for WebDataset loaders",
            [("stage_dir", "", "a finished stage folder with images (download, adopt, clean or filter)")], {"export": ExportConfig},
            "folder for part-NNNNN.tar", dask=True),
    Command("index", "a faiss index over an embeddings folder's image vectors, for `dallekit search` (rebuild after embedding again)",
            [("embeddings", "", "a finished embeddings folder (from `dallekit embed`)")], {"index": IndexConfig},
            "index folder: index.faiss, index.json, rows.parquet"),
    Command("search", "the images nearest to a text or an image: a table of uid, caption, score and a grid PNG (--grid)",
            [("index", "", "an index folder (from `dallekit index`)"), ("query", "?", "the text to search for (or --image FILE)")],
            {"search": SearchConfig}, None),
    Command("convert-openai-dvae", "convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) to safetensors, once", [], {},
            "dVAE folder to write",
            extra=[(("--encoder",), {"required": True, "help": "encoder.pkl from https://cdn.openai.com/dall-e/encoder.pkl"}),
                   (("--decoder",), {"required": True, "help": "decoder.pkl from https://cdn.openai.com/dall-e/decoder.pkl"})]),
    Command("run", "every step, URL lists to samples and report.html, as one job on one Dask cluster (rerun to resume)", [],
            {"run": RunConfig}, None, dask=True),
    Command("demo", "synthetic shapes served on 127.0.0.1, through the pipeline", [], {"demo": DemoOptions}, None, dask=True),
]
CONVERT_DESCRIPTION = (
    "Loads the dall-e package's pickled modules with torch.load(weights_only=True), allowlisting only the dall_e classes, "
    "and writes a dVAE folder (model.safetensors + config.json). Needs the optional extra: pip install 'dallekit[openai-dvae]'. "
    "This is the only command that reads a pickle."
)
RUN_DESCRIPTION = (
    "Sections of the TOML file: [run] (out, inputs, ...), [cluster], and one per step named like its subcommand: [ingest] "
    "[download] [clean] [train-clip] [filter] [train-tokenizer] (or [train-dvae]) [encode] [train] [sample] [evaluate]. Options given here override "
    "[run] and [cluster]."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="dallekit", description="Build text-image datasets on Dask and train a compact DALL-E.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        description = {"convert-openai-dvae": CONVERT_DESCRIPTION, "run": RUN_DESCRIPTION}.get(command.name)
        p = sub.add_parser(command.name, help=command.help, description=description)
        for dest, nargs, help_text in command.positionals:
            p.add_argument(dest, metavar=dest.upper(), help=help_text, **({"nargs": nargs} if nargs else {}))
        if command.out_help:
            p.add_argument("--out", required=command.out_required, help=command.out_help)
        for flags, kwargs in command.extra:
            p.add_argument(*flags, **kwargs)
        for section, config_class in command.sections.items():
            add_options(p, config_class, skip=("prompts",) if section == "sample" else ())
        if command.dask:
            add_options(p, ClusterConfig)
        p.add_argument("--config", required=command.name == "run",
                       help="TOML file; its sections named like the subcommands (and [cluster]) give defaults")
    return parser


def dispatch(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand; returns the exit code."""
    from dallekit import commands

    args = build_parser().parse_args(argv)
    where = getattr(args, "config", None)
    toml = load_toml(where)
    check_sections(toml, where or "options", RUN_SECTION_NAMES if args.command == "run" else SECTION_NAMES)
    command = next(c for c in COMMANDS if c.name == args.command)
    configs = {
        section: build_config(config_class, args, toml.get(section), where=f"{where or 'options'} [{section}]")
        for section, config_class in command.sections.items()
    }
    if command.dask:
        configs["cluster"] = build_config(ClusterConfig, args, toml.get("cluster"), where=f"{where or 'options'} [cluster]")
    return commands.HANDLERS[args.command](args, configs, toml)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        code = dispatch(argv)
    except BadInputError as err:
        print(f"dallekit: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dallekit: interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    except OSError as err:
        converted = environment_error(err, "file system")
        if converted is None:
            raise
        print(f"dallekit: error: {converted}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
