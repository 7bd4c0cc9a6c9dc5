"""The `dallekit` command: one subcommand per stage or job.

Exit codes: 0 done, 2 bad input or usage (one line on stderr, no traceback), 1 anything else,
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

from dallekit.config import (
    BadInputError,
    CleanConfig,
    ClusterConfig,
    DownloadConfig,
    EncodeConfig,
    FilterConfig,
    IngestConfig,
    RunConfig,
    TrainClipConfig,
    TrainConfig,
    TrainDVAEConfig,
    add_options,
    build_config,
    load_toml,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInputError(f"{self.prog}: {message}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file; its [<stage>] and [cluster] sections give defaults")
    add_options(parser, ClusterConfig)


def _stage(sub, name: str, help_text: str, config_class: type, out_help: str) -> argparse.ArgumentParser:
    """A Dask stage's subcommand: --out, its config's options, --config and the cluster options."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--out", required=True, help=out_help)
    add_options(p, config_class)
    _add_common(p)
    return p


def _add_clip_options(parser: argparse.ArgumentParser) -> None:
    """The CLIP used to rerank or score: a local checkpoint, or a model name with a pretrained tag."""
    parser.add_argument("--clip-checkpoint", help="a local open_clip folder or .safetensors (e.g. from train-clip)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name for --clip-pretrained or a .safetensors checkpoint")
    parser.add_argument("--clip-pretrained", help="open_clip pretrained tag (weights from the hub)")


def _clip_scorer(args: argparse.Namespace):
    from dallekit.models.clip import load_clip

    return load_clip(args.clip_model, args.clip_pretrained, args.clip_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="dallekit", description="Build text-image datasets on Dask and train a compact DALL-E.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _stage(sub, "ingest", "URL lists (CC3M, LAION, CSV/TSV/JSONL/Parquet, image folders) -> URL shards", IngestConfig,
               "output folder of URL shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or folders (local paths or fsspec URLs)")
    p = _stage(sub, "download", "URL shards -> image shards with img2dataset's downloader", DownloadConfig, "output folder of image shards")
    p.add_argument("urls", metavar="URL_SHARDS", help="folder written by `dallekit ingest`")
    p = _stage(sub, "clean", "downloaded shards -> repaired captions, no failed downloads or duplicates", CleanConfig,
               "output folder of cleaned shards")
    p.add_argument("downloaded", metavar="DOWNLOADED", help="folder written by `dallekit download`")
    p = _stage(sub, "filter", "cleaned shards -> rows passing image, caption, language and CLIP rules", FilterConfig,
               "output folder of filtered shards")
    p.add_argument("cleaned", metavar="CLEANED", help="folder written by `dallekit clean`")

    p = sub.add_parser("train-dvae", help="train a discrete VAE on the images of filtered shards")
    p.add_argument("filtered", metavar="FILTERED", help="folder of image shards (from `dallekit filter`)")
    p.add_argument("--out", required=True, help="run folder: model.safetensors, config.json, checkpoint/, metrics.jsonl, grids")
    add_options(p, TrainDVAEConfig)
    p.add_argument("--config", help="TOML file; its [train-dvae] section gives defaults")

    p = sub.add_parser("train-clip", help="train a small open_clip model on the kept pairs (an offline reranker and filter)")
    p.add_argument("filtered", metavar="FILTERED", help="folder of image shards with captions (from `dallekit filter`)")
    p.add_argument("--out", required=True, help="open_clip folder: open_clip_config.json + open_clip_model.safetensors")
    add_options(p, TrainClipConfig)
    p.add_argument("--config", help="TOML file; its [train-clip] section gives defaults")

    p = sub.add_parser("sample", help="generate images for prompts, rerank with CLIP, keep the best")
    p.add_argument("--model", required=True, help="transformer folder (from `dallekit train`)")
    p.add_argument("--dvae", required=True, help="the dVAE folder its tokens came from")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("-n", type=int, default=16, help="candidates per prompt (default: 16; DALL-E used 512)")
    p.add_argument("--keep", type=int, default=4, help="best candidates kept per prompt (default: 4)")
    p.add_argument("--batch-size", type=int, default=16, help="candidates generated at once")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    _add_clip_options(p)
    p.add_argument("--out", required=True, help="folder for PNGs, grids and samples.jsonl")

    p = sub.add_parser("evaluate", help="validation loss, CLIP reranking effect (and FID when possible) on held-out tokens")
    p.add_argument("--model", required=True, help="transformer folder")
    p.add_argument("--dvae", required=True, help="the dVAE folder its tokens came from")
    p.add_argument("--tokens", required=True, help="held-out token shards")
    _add_clip_options(p)
    p.add_argument("-n", type=int, default=16, help="candidates per caption; the curve goes 1, 2, 4, ... n")
    p.add_argument("--captions", type=int, default=16, help="held-out captions to generate for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for eval.json and clip_vs_n.png")

    p = sub.add_parser("train", help="train the DALL-E transformer on token Parquet (torchrun for several GPUs)")
    p.add_argument("tokens", metavar="TOKENS", help="folder of token shards (from `dallekit encode`)")
    p.add_argument("--out", required=True, help="run folder: model.safetensors, config.json, checkpoint/, metrics.jsonl")
    add_options(p, TrainConfig)
    p.add_argument("--config", help="TOML file; its [train] section gives defaults")

    p = _stage(sub, "encode", "filtered image shards -> token Parquet (dVAE codes + BPE ids)", EncodeConfig, "output folder of token shards")
    p.add_argument("filtered", metavar="FILTERED", help="folder of image shards (from `dallekit filter`)")
    p.add_argument("--dvae", required=True, help="dVAE folder (from `dallekit train-dvae` or `convert-openai-dvae`)")

    p = sub.add_parser("decode", help="token rows -> PNGs through the dVAE, for inspection")
    p.add_argument("tokens", metavar="TOKENS", help="folder of token shards")
    p.add_argument("--dvae", required=True, help="the dVAE folder that encoded them")
    p.add_argument("--out", required=True, help="folder for <uid>.png and grid.png")
    p.add_argument("--limit", type=int, default=64, help="rows to decode (default: 64)")

    p = sub.add_parser("train-bpe", help="train a byte-level BPE text tokenizer on captions")
    p.add_argument("captions", metavar="CAPTIONS", help="a stage folder with a caption column, or text files with one caption per line")
    p.add_argument("--out", required=True, help="folder for tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=16384, help="vocabulary size (default: 16384, DALL-E's)")

    p = sub.add_parser(
        "convert-openai-dvae",
        help="convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) to safetensors, once",
        description="Loads the dall-e package's pickled modules with torch.load(weights_only=True), allowlisting only "
        "the dall_e classes, and writes a dVAE folder (model.safetensors + config.json). Needs the optional extra: "
        "pip install 'dallekit[openai-dvae]'. This is the only command that reads a pickle.",
    )
    p.add_argument("--encoder", required=True, help="encoder.pkl from https://cdn.openai.com/dall-e/encoder.pkl")
    p.add_argument("--decoder", required=True, help="decoder.pkl from https://cdn.openai.com/dall-e/decoder.pkl")
    p.add_argument("--out", required=True, help="dVAE folder to write")

    p = sub.add_parser("run", help="every step, URL lists to samples and report.html, as one job on one Dask cluster (rerun to resume)",
                       description="Sections of the TOML file: [run] (out, inputs, ...), [cluster], and one per step named like "
                       "its subcommand: [ingest] [download] [clean] [train-clip] [filter] [train-dvae] [encode] [train] [sample] "
                       "[evaluate]. Options given here override [run] and [cluster].")
    p.add_argument("--config", required=True, help="pipeline TOML file (see dallekit/configs/)")
    add_options(p, RunConfig)
    add_options(p, ClusterConfig)

    p = sub.add_parser("demo", help="synthetic shapes served on 127.0.0.1, through the pipeline")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.add_argument("--samples", type=int, help="number of generated pairs (default 6000, or 300 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    _add_common(p)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    toml = load_toml(getattr(args, "config", None))

    def section(config_class: type, name: str):
        """The config of one subcommand: its TOML section, overridden by the command line."""
        return build_config(config_class, args, toml.get(name), where=f"{getattr(args, 'config', None) or 'options'} [{name}]")

    cluster = section(ClusterConfig, "cluster")
    from dallekit.pipeline.cluster import dask_client
    from dallekit.pipeline.shards import format_summary

    if args.command == "decode":
        from dallekit.decode import decode_tokens

        written = decode_tokens(args.tokens, args.dvae, args.out, args.limit)
        print(f"decode: {len(written)} images and grid.png in {args.out}")
        return 0
    if args.command == "convert-openai-dvae":
        from dallekit.models.openai_dvae import convert_openai_dvae

        config = convert_openai_dvae(args.encoder, args.decoder, args.out)
        print(f"convert-openai-dvae: {config.codebook_size} codes, {config.grid}x{config.grid} grid, written to {args.out}")
        return 0
    if args.command == "train-bpe":
        from dallekit.pipeline.shards import iter_captions
        from dallekit.tokenize.text import train_bpe

        tokenizer = train_bpe(iter_captions(args.captions), args.out, args.vocab_size)
        print(f"train-bpe: {tokenizer.vocab_size} tokens in {tokenizer.path}")
        return 0
    if args.command == "train-clip":
        from dallekit.train_clip import train_clip

        options = section(TrainClipConfig, "train-clip")
        metrics = train_clip(args.filtered, args.out, options)
        print("train-clip: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return 0
    if args.command == "sample":
        from dallekit.config import SampleConfig
        from dallekit.sample import sample

        prompts = list(args.prompt)
        if args.prompts:
            try:
                prompts += [line.strip() for line in open(args.prompts, encoding="utf-8") if line.strip()]
            except OSError as err:
                raise BadInputError(f"{args.prompts}: cannot read prompts ({err.strerror})") from None
        scorer = _clip_scorer(args) if args.clip_checkpoint or args.clip_pretrained else None
        options = SampleConfig(prompts=prompts, n=args.n, keep=args.keep, batch_size=args.batch_size, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale, seed=args.seed)
        records = sample(args.model, args.dvae, prompts, args.out, options, scorer)
        print(f"sample: {len(records)} images for {len(prompts)} prompts in {args.out}" + ("" if scorer else " (no CLIP given: not reranked)"))
        return 0
    if args.command == "evaluate":
        from dallekit.evaluate import evaluate

        if not (args.clip_checkpoint or args.clip_pretrained):
            raise BadInputError("evaluate needs a CLIP: --clip-checkpoint DIR (e.g. from train-clip) or --clip-model M --clip-pretrained T")
        scorer = _clip_scorer(args)
        results = evaluate(args.model, args.dvae, args.tokens, args.out, scorer, n=args.n, captions=args.captions, seed=args.seed)
        print("evaluate: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items() if isinstance(v, float)))
        print(f"evaluate: {results['fid_note']}")
        return 0
    if args.command == "train":
        from dallekit.train import train_transformer

        options = section(TrainConfig, "train")
        metrics = train_transformer(args.tokens, args.out, options)
        print("train: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        return 0
    if args.command == "train-dvae":
        from dallekit.train_dvae import train_dvae

        options = section(TrainDVAEConfig, "train-dvae")
        metrics = train_dvae(args.filtered, args.out, options)
        print("train-dvae: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return 0
    if args.command == "run":
        from dallekit.pipeline.run import load_pipeline, run_pipeline

        run_pipeline(load_pipeline(toml, args.config, args))
        return 0
    if args.command == "demo":
        from dallekit.demo import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, quick=args.quick, samples=args.samples, seed=args.seed), cluster)
        return 0
    if args.command == "ingest":
        from dallekit.pipeline.ingest import ingest, plan_ingest

        config = section(IngestConfig, "ingest")
        blocks = plan_ingest(args.inputs, config)  # bad input fails here, before a cluster starts
        with dask_client(cluster) as client:
            stats = ingest(args.inputs, args.out, config, client, blocks=blocks)
    elif args.command == "download":
        from dallekit.pipeline.download import download, plan_download

        config = section(DownloadConfig, "download")
        tasks = plan_download(args.urls, config)
        with dask_client(cluster) as client:
            stats = download(args.urls, args.out, config, client, tasks=tasks)
    elif args.command == "clean":
        from dallekit.pipeline.clean import clean, plan_clean

        config = section(CleanConfig, "clean")
        paths = plan_clean(args.downloaded)
        with dask_client(cluster) as client:
            stats = clean(args.downloaded, args.out, config, client, paths=paths)
    elif args.command == "filter":
        from dallekit.pipeline.filter import filter_stage, plan_filter

        config = section(FilterConfig, "filter")
        paths = plan_filter(args.cleaned, config)
        with dask_client(cluster) as client:
            stats = filter_stage(args.cleaned, args.out, config, client, paths=paths)
    elif args.command == "encode":
        from dallekit.pipeline.encode import encode, plan_encode

        config = section(EncodeConfig, "encode")
        plan = plan_encode(args.filtered, args.dvae, config)
        with dask_client(cluster) as client:
            stats = encode(args.filtered, args.dvae, args.out, config, client, plan=plan)
    print(format_summary(stats))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        code = run(argv)
    except BadInputError as err:
        print(f"dallekit: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dallekit: interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
