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
    FilterConfig,
    IngestConfig,
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="dallekit", description="Build text-image datasets on Dask and train a compact DALL-E.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ingest", help="URL lists (CC3M, LAION, CSV/TSV/JSONL/Parquet, image folders) -> URL shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or folders (local paths or fsspec URLs)")
    p.add_argument("--out", required=True, help="output folder of URL shards")
    add_options(p, IngestConfig)
    _add_common(p)

    p = sub.add_parser("download", help="URL shards -> image shards with img2dataset's downloader")
    p.add_argument("urls", metavar="URL_SHARDS", help="folder written by `dallekit ingest`")
    p.add_argument("--out", required=True, help="output folder of image shards")
    add_options(p, DownloadConfig)
    _add_common(p)

    p = sub.add_parser("clean", help="downloaded shards -> repaired captions, no failed downloads or duplicates")
    p.add_argument("downloaded", metavar="DOWNLOADED", help="folder written by `dallekit download`")
    p.add_argument("--out", required=True, help="output folder of cleaned shards")
    add_options(p, CleanConfig)
    _add_common(p)

    p = sub.add_parser("filter", help="cleaned shards -> rows passing image, caption, language and CLIP rules")
    p.add_argument("cleaned", metavar="CLEANED", help="folder written by `dallekit clean`")
    p.add_argument("--out", required=True, help="output folder of filtered shards")
    add_options(p, FilterConfig)
    _add_common(p)

    p = sub.add_parser("demo", help="synthetic shapes served on 127.0.0.1, through the pipeline")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.add_argument("--samples", type=int, help="number of generated pairs (default 3000, or 300 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    _add_common(p)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    toml = load_toml(args.config)
    cluster = build_config(ClusterConfig, args, toml.get("cluster"), where=f"{args.config or 'options'} [cluster]")
    from dallekit.pipeline.cluster import dask_client
    from dallekit.pipeline.shards import format_summary

    if args.command == "demo":
        from dallekit.demo import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, quick=args.quick, samples=args.samples, seed=args.seed), cluster)
        return 0
    if args.command == "ingest":
        from dallekit.pipeline.ingest import ingest, plan_ingest

        config = build_config(IngestConfig, args, toml.get("ingest"), where=f"{args.config or 'options'} [ingest]")
        blocks = plan_ingest(args.inputs, config)  # bad input fails here, before a cluster starts
        with dask_client(cluster) as client:
            stats = ingest(args.inputs, args.out, config, client, blocks=blocks)
    elif args.command == "download":
        from dallekit.pipeline.download import download, plan_download

        config = build_config(DownloadConfig, args, toml.get("download"), where=f"{args.config or 'options'} [download]")
        tasks = plan_download(args.urls, config)
        with dask_client(cluster) as client:
            stats = download(args.urls, args.out, config, client, tasks=tasks)
    elif args.command == "clean":
        from dallekit.pipeline.clean import clean, plan_clean

        config = build_config(CleanConfig, args, toml.get("clean"), where=f"{args.config or 'options'} [clean]")
        paths = plan_clean(args.downloaded)
        with dask_client(cluster) as client:
            stats = clean(args.downloaded, args.out, config, client, paths=paths)
    elif args.command == "filter":
        from dallekit.pipeline.filter import filter_stage, plan_filter

        config = build_config(FilterConfig, args, toml.get("filter"), where=f"{args.config or 'options'} [filter]")
        paths = plan_filter(args.cleaned, config)
        with dask_client(cluster) as client:
            stats = filter_stage(args.cleaned, args.out, config, client, paths=paths)
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
