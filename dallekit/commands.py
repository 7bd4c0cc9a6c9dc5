"""What each `dallekit` subcommand does, given its parsed arguments and its checked configs.

`cli.py` declares the commands and their options; this module holds one short handler per
command, looked up in HANDLERS. Heavy imports happen inside the handlers, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import os

from dallekit.errors import BadInputError
from dallekit.pipeline.registry import STAGES


def _summary(stats: dict) -> int:
    from dallekit.pipeline.shards import format_summary

    print(format_summary(stats))
    return 0


def stage_inputs(name: str, args: argparse.Namespace) -> list:
    """A Dask stage's plan inputs from its command line, as its entry of STAGES declares them (its config comes last)."""
    entry = STAGES[name]
    return [getattr(args, dest) for dest, _, _ in entry.inputs] + [getattr(args, dest) for dest in entry.option_inputs]


def stage(args: argparse.Namespace, configs: dict, toml) -> int:
    """Any Dask stage: plan it (bad input fails before a cluster starts), then run it on a client started only when a task runs."""
    from dallekit.pipeline.cluster import LazyClient
    from dallekit.pipeline.stage import run_plan, stage_named

    spec, plan_stage = stage_named(args.command)
    config = configs[args.command]
    plan = plan_stage(*stage_inputs(args.command, args), config)
    with LazyClient(configs["cluster"]) as client:
        return _summary(run_plan(spec, plan, args.out, client, config.overwrite))


def download(args: argparse.Namespace, configs: dict, toml) -> int:
    """dallekit download: the stage, or with --retry-failed DIR a retry of its failed rows in place."""
    import dataclasses

    from dallekit.config import DownloadConfig

    if not args.retry_failed:
        if not args.urls or not args.out:
            raise BadInputError("download: give URLS and --out (or --retry-failed DIR to fetch a finished download's failures again)")
        from dallekit.pipeline.download import refuse_during_retry

        refuse_during_retry(args.out)
        return stage(args, configs, toml)
    if args.urls or args.out:
        raise BadInputError(f"download --retry-failed {args.retry_failed}: rewrites that folder in place; give no URLS or --out")
    from dallekit.pipeline.cluster import LazyClient
    from dallekit.pipeline.retry import retry_failed

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DownloadConfig) if hasattr(args, f.name)}
    with LazyClient(configs["cluster"]) as client:
        return _summary(retry_failed(args.retry_failed, client, given))


def export(args, configs, toml) -> int:
    """dallekit export."""
    from dallekit.pipeline.cluster import LazyClient
    from dallekit.pipeline.export import export as write_tars

    with LazyClient(configs["cluster"]) as client:
        result = write_tars(args.stage_dir, args.out, configs["export"], client)
    print(f"export: {result['samples']} samples in {result['shards']} WebDataset tars in {args.out}"
          + (f" ({result['no_image']} rows without an image left out)" if result["no_image"] else ""))
    return 0


def _check_output_folder(args: argparse.Namespace, *inputs: str) -> None:
    from dallekit.pipeline.shards import prepare_output

    prepare_output(args.out, [i for i in inputs if i])


def _no_model_yet(args: argparse.Namespace, resume: bool) -> None:
    """A trainer's --out holding a model is continued with --resume, never silently replaced."""
    if not resume and any(os.path.exists(os.path.join(args.out, name)) for name in ("model.safetensors", "checkpoint")):
        raise BadInputError(f"--out {args.out}: holds a trained model; pass --resume to continue it, or give another folder")


def train_tokenizer(args, configs, toml) -> int:
    """dallekit train-tokenizer (and its old name, train-dvae)."""
    from dallekit.training.tokenizer import train_tokenizer as train

    _check_output_folder(args, args.filtered, configs["train-tokenizer"].perceptual_weights, configs["train-tokenizer"].discriminator_init)
    _no_model_yet(args, configs["train-tokenizer"].resume)
    metrics = train(args.filtered, args.out, configs["train-tokenizer"])
    print(f"{args.command}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


def train_clip(args, configs, toml) -> int:
    """dallekit train-clip."""
    from dallekit.training.clip import train_clip as train

    _check_output_folder(args, args.filtered)
    metrics = train(args.filtered, args.out, configs["train-clip"])
    print("train-clip: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


def train(args, configs, toml) -> int:
    """dallekit train."""
    from dallekit.training.transformer import train_transformer

    _check_output_folder(args, args.tokens)
    _no_model_yet(args, configs["train"].resume)
    metrics = train_transformer(args.tokens, args.out, configs["train"])
    print("train: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    if metrics.get("best_step") is not None:
        print(f"train: {args.out} holds the model of step {metrics['best_step']}, the best validation image loss; checkpoint/ the latest state")
    if metrics.get("early_stopped"):
        print(f"train: stopped early at step {metrics['step']} (--early-stop); --resume with a larger --early-stop, or 0, continues")
    return 0


def _scorer(options, required: bool):
    """The CLIP of --clip-checkpoint or --clip-model/--clip-pretrained, or None when neither is given and none is required."""
    from dallekit.models.clip import load_clip

    if not (options.clip_checkpoint or options.clip_pretrained):
        if required:
            raise BadInputError("evaluate needs a CLIP: --clip-checkpoint DIR (e.g. from train-clip) or --clip-model M --clip-pretrained T")
        return None
    return load_clip(options.clip_model, options.clip_pretrained, options.clip_checkpoint)


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompts file."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise BadInputError(f"{path}: not a regular file, expected one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise BadInputError(f"{path}: cannot read prompts ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text near byte {err.start}; expected one prompt per line") from None


def sample(args, configs, toml) -> int:
    """dallekit sample."""
    from dataclasses import replace

    from dallekit.demo.synthetic import SHAPES_JUDGE
    from dallekit.generation.sample import sample as generate

    options = configs["sample"]
    prompts = list(options.prompts) + list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    _check_output_folder(args, args.model, args.dvae)
    scorer = _scorer(configs["clip"], required=False)
    records = generate(args.model, args.dvae, prompts, args.out, replace(options, prompts=prompts), scorer, judge=SHAPES_JUDGE)
    print(f"sample: {len(records)} images for {len(prompts)} prompts in {args.out}" + ("" if scorer else " (no CLIP given: not reranked)"))
    return 0


def evaluate(args, configs, toml) -> int:
    """dallekit evaluate."""
    from dallekit.demo.synthetic import SHAPES_JUDGE
    from dallekit.generation.evaluate import evaluate as run_evaluation

    options = configs["evaluate"]
    _check_output_folder(args, args.model, args.dvae, args.tokens)
    scorer = _scorer(configs["clip"], required=True)
    results = run_evaluation(args.model, args.dvae, args.tokens, args.out, scorer, options, judge=SHAPES_JUDGE)
    print("evaluate: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
    print(f"evaluate: {results['fid_note']}")
    return 0


def decode(args, configs, toml) -> int:
    """dallekit decode."""
    from dallekit.generation.decode import decode_tokens

    _check_output_folder(args, args.tokens, args.dvae)
    written = decode_tokens(args.tokens, args.dvae, args.out, configs["decode"].limit)
    print(f"decode: {len(written)} images and grid.png in {args.out}")
    return 0


def train_bpe(args, configs, toml) -> int:
    """dallekit train-bpe."""
    from dallekit.io import iter_captions
    from dallekit.tokenize.text import train_bpe as train

    _check_output_folder(args, args.captions)
    tokenizer = train(iter_captions(args.captions), args.out, configs["train-bpe"].vocab_size)
    print(f"train-bpe: {tokenizer.vocab_size} tokens in {tokenizer.path}")
    return 0


def index(args, configs, toml) -> int:
    """dallekit index."""
    from dallekit.search import build_index

    options = configs["index"]
    info = build_index(args.embeddings, args.out, options.max_memory, options.kind, options.overwrite)
    print(f"index: {info['factory']} over {info['rows']} vectors of {info['dim']} dimensions in {args.out} ({info['seconds']:.1f} s)")
    return 0


def search(args, configs, toml) -> int:
    """dallekit search: a table of the hits and their grid PNG."""
    from dallekit.search import open_index, write_grid

    options = configs["search"]
    if bool(args.query) == bool(options.image):
        raise BadInputError("search: give a text to search for or --image FILE (one of them)")
    found = open_index(args.index, options.clip_model, options.clip_pretrained, options.clip_checkpoint, options.device)
    hits = found.image(options.image, options.k) if options.image else found.text(args.query, options.k)
    print(f"{'uid':<20} {'score':>7}  caption")
    for _, hit in hits.iterrows():
        caption = str(hit.get("caption", "") or "").replace("\n", " ")
        print(f"{str(hit['uid']):<20} {hit['score']:>7.3f}  {caption[:100]}")
    if len(hits):
        write_grid(hits, options.grid)
        print(f"search: {len(hits)} hits; their grid in {options.grid}")
    return 0


def convert_openai_dvae(args, configs, toml) -> int:
    """dallekit convert-openai-dvae."""
    from dallekit.models.openai_dvae import convert_openai_dvae as convert

    _check_output_folder(args)
    config = convert(args.encoder, args.decoder, args.out)
    print(f"convert-openai-dvae: {config.codebook_size} codes, {config.grid}x{config.grid} grid, written to {args.out}")
    return 0


def every_step(args, configs, toml) -> int:
    """dallekit run: every step of one TOML file."""
    from dallekit.demo.synthetic import SHAPES_JUDGE
    from dallekit.jobs.steps import load_pipeline, run_pipeline

    run_pipeline(load_pipeline(toml, args.config, args), judge=SHAPES_JUDGE)
    return 0


def demo(args, configs, toml) -> int:
    """dallekit demo."""
    from dallekit.demo.job import run_demo

    run_demo(configs["demo"], configs["cluster"])
    return 0


# every stage of pipeline.stage.STAGES runs through `stage`; download has its --retry-failed mode
HANDLERS = {name: stage for name in STAGES} | {"download": download} | {
    "train-tokenizer": train_tokenizer, "train-dvae": train_tokenizer, "train-clip": train_clip, "train": train, "sample": sample, "evaluate": evaluate, "decode": decode, "train-bpe": train_bpe,
    "export": export, "index": index, "search": search, "convert-openai-dvae": convert_openai_dvae, "run": every_step, "demo": demo,
}
