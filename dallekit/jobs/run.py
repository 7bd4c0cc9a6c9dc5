"""`dallekit run --config pipeline.toml`: every step of a run as one job on one Dask cluster.

The TOML file has one section per step, named like its subcommand (`[ingest]`, `[download]`,
`[clean]`, `[train-clip]`, `[filter]`, `[train-tokenizer]` (or its old name `[train-dvae]`), `[encode]`, `[train]`, `[sample]`,
`[evaluate]`), plus `[cluster]` and `[run]` (the run folder, the inputs, which steps run).
Steps run in that order; train-clip only with `[run] train_clip = true`, when the CLIP trained
on the cleaned pairs replaces [filter]'s CLIP for filtering, reranking and evaluation.
The run folder gets one sub-folder per step (DESIGN.md) and `report.html`.

Rerunning the same command resumes: complete stages are skipped, a stage's complete shards are
kept, the trainers continue from their last checkpoint, and steps with a finished output
(tokenizer, CLIP, samples, evaluation) are not redone.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from dallekit import config
from dallekit.config import RUN_STEPS, build_config
from dallekit.errors import BadInputError
from dallekit.io import iter_captions, list_shards
from dallekit.jobs.report import write_report
from dallekit.jobs.timing import StepTimer
from dallekit.pipeline.clean import clean
from dallekit.pipeline.cluster import LazyClient
from dallekit.pipeline.download import download
from dallekit.pipeline.encode import encode
from dallekit.pipeline.filter import filter_stage
from dallekit.pipeline.ingest import ingest, plan_ingest
from dallekit.pipeline.shards import format_summary

if typing.TYPE_CHECKING:
    from dallekit.generation.sample import PixelJudge


@dataclass
class Pipeline:
    """Every section of a pipeline config, each a stage's own config class."""

    run: config.RunConfig
    cluster: config.ClusterConfig
    ingest: config.IngestConfig
    download: config.DownloadConfig
    clean: config.CleanConfig
    filter: config.FilterConfig
    train_tokenizer: config.TrainTokenizerConfig
    encode: config.EncodeConfig
    train: config.TrainConfig
    train_clip: config.TrainClipConfig
    sample: config.SampleConfig
    evaluate: config.EvaluateConfig


SECTIONS: dict[str, type] = {name.replace("_", "-"): kind for name, kind in typing.get_type_hints(Pipeline).items()}


def load_pipeline(toml: dict, where: str, args: argparse.Namespace | None = None) -> Pipeline:
    """Build a Pipeline from a parsed TOML file; `args` (the command line) overrides [run] and [cluster]."""
    toml = config.resolve_section_aliases(toml, where)
    config.check_sections(toml, where, list(SECTIONS))
    configs = {}
    for name, config_class in SECTIONS.items():
        override = args if name in ("run", "cluster") and args is not None else argparse.Namespace()
        configs[name.replace("-", "_")] = build_config(config_class, override, toml.get(name), f"{where} [{name}]")
    return Pipeline(**configs)  # an empty [run] inputs is refused by its option check


def run_folders(out: str) -> dict[str, str]:
    """Where each step writes inside a run folder (DESIGN.md's layout)."""
    names = ["ingest", "download", "clean", "filter", "tokenizer", "bpe", "tokens", "model", "clip", "samples", "eval"]
    folders = {name: f"{out.rstrip('/')}/{name}" for name in names}
    if (Path(out) / "dvae" / "config.json").is_file() and not Path(folders["tokenizer"]).exists():
        folders["tokenizer"] = f"{out.rstrip('/')}/dvae"  # a run folder from before the FSQ tokenizer resumes with its dVAE
    return folders


STAGE_MARKERS = ("_fingerprint.json", "_stats.json", "_SUCCESS", "_export.json")


def check_run_folder(out: str) -> None:
    """Bad input when the run folder is, or lies inside, a stage folder: its step folders would become part of that stage."""
    folder = Path(out).absolute()
    for place in (folder, *folder.parents):
        marker = next((m for m in STAGE_MARKERS if (place / m).is_file()), None)
        if marker is not None:
            where = "is" if place == folder else f"lies inside {place}, which is"
            raise BadInputError(f"[run] out {out}: {where} a dallekit stage folder ({marker}); give a run folder of its own")
        if place == folder and any(folder.glob("part-*.parquet")):
            raise BadInputError(f"[run] out {out}: holds Parquet shards (part-*.parquet); give a run folder of its own")


def check_run_models(p: Pipeline) -> None:
    """The models and weights files a run reads rather than trains ([run] dvae, [train-tokenizer]'s files, [encode] text_tokenizer, a CLIP checkpoint), checked before any stage runs."""
    steps = RUN_STEPS[: RUN_STEPS.index(run_step(p.run.stop_after)) + 1]
    if p.run.dvae is not None and "encode" in steps:
        from dallekit.tokenize.image import ImageTokenizer

        ImageTokenizer.load(p.run.dvae, "cpu")  # bad input naming the folder (not a tokenizer, weights that do not fit), not after four stages
    if p.run.dvae is None and "train-tokenizer" in steps:
        from dallekit.models.weights import check_weights_file

        t = p.train_tokenizer
        for name, path in (("perceptual_weights", t.perceptual_weights), ("discriminator_init", t.discriminator_init)):
            if path is not None:
                check_weights_file(path, f"[train-tokenizer] {name}")
    if not p.run.bpe_vocab_size and p.encode.text_tokenizer != "clip-bpe":
        from dallekit.tokenize.text import load_text_tokenizer

        load_text_tokenizer(p.encode.text_tokenizer)
    checkpoint = p.filter.clip_checkpoint
    if p.filter.clip and not p.run.train_clip and checkpoint and not Path(checkpoint).exists():
        raise BadInputError(f"[filter] clip_checkpoint {checkpoint}: no such file or folder")


def run_step(name: str) -> str:
    """A step's current name (train-dvae is train-tokenizer's old one)."""
    return "train-tokenizer" if name == "train-dvae" else name


def _checkpoint_exists(folder: str) -> bool:
    return (Path(folder) / "checkpoint" / "state.json").exists()


def run_pipeline(p: Pipeline, judge: PixelJudge | None = None, timer: StepTimer | None = None) -> dict:
    """Run (or resume) every step up to `run.stop_after`; returns each Dask stage's stats, the final metrics and the step timings."""
    steps = set(RUN_STEPS[: RUN_STEPS.index(run_step(p.run.stop_after)) + 1])
    d = run_folders(p.run.out)
    if p.run.train_clip:  # the CLIP trained on the cleaned pairs scores the filter and reranks the samples
        p = replace(p, filter=replace(p.filter, clip=True, clip_model=p.train_clip.model, clip_pretrained=None, clip_checkpoint=d["clip"]))
    check_run_folder(p.run.out)
    check_run_models(p)
    Path(p.run.out).mkdir(parents=True, exist_ok=True)
    ingest_plan = plan_ingest(p.run.inputs, p.ingest)  # bad input fails before a cluster starts
    result: dict = {"stages": []}
    stages = result["stages"]
    dvae_dir = p.run.dvae or d["tokenizer"]
    timer = timer or StepTimer()
    with LazyClient(p.cluster) as client:  # stopped while a trainer runs in this process
        with timer.step("ingest", client):
            stages.append(ingest(p.run.inputs, d["ingest"], p.ingest, client, plan=ingest_plan))
        if "download" in steps:
            with timer.step("download", client):
                stages.append(download(d["ingest"], d["download"], p.download, client))
        if "clean" in steps:
            with timer.step("clean", client):
                stages.append(clean(d["download"], d["clean"], p.clean, client))
        if p.run.train_clip and "train-clip" in steps and not (Path(d["clip"]) / "open_clip_model.safetensors").exists():
            from dallekit.training.clip import train_clip

            client.stop()
            with timer.step("train-clip"):
                result["train-clip"] = train_clip(d["clean"], d["clip"], p.train_clip)
        if "filter" in steps:
            with timer.step("filter", client):
                stages.append(filter_stage(d["clean"], d["filter"], p.filter, client))
        if "train-tokenizer" in steps and p.run.dvae is None:
            from dallekit.training.tokenizer import train_tokenizer

            client.stop()
            with timer.step("train-tokenizer"):
                resume = _checkpoint_exists(d["tokenizer"])
                result["tokenizer"] = train_tokenizer(d["filter"], d["tokenizer"], replace(p.train_tokenizer, resume=resume))
        encode_config = p.encode
        if p.run.bpe_vocab_size and "train-bpe" in steps:
            encode_config = replace(p.encode, text_tokenizer=d["bpe"])
            if not (Path(d["bpe"]) / "tokenizer.json").exists():
                from dallekit.tokenize.text import train_bpe

                with timer.step("train-bpe"):
                    train_bpe(iter_captions(d["filter"]), d["bpe"], vocab_size=p.run.bpe_vocab_size)
        if "encode" in steps:
            with timer.step("encode", client):
                stages.append(encode(d["filter"], dvae_dir, d["tokens"], encode_config, client))
    for stats in stages:
        print(format_summary(stats))
    if "train" in steps:
        result |= _train_and_sample(p, d, dvae_dir, steps, judge, timer)
    result["timings"] = timer.rows
    timer.save(p.run.out)
    if "report" in steps:
        report = write_report(p.run.out)
        print(f"run: report in {report}")
    return result


def _train_and_sample(p: Pipeline, d: dict[str, str], dvae_dir: str, steps: set[str], judge: PixelJudge | None, timer: StepTimer) -> dict:
    """The steps after the Dask stages: train, sample, evaluate (each skipped when done)."""
    from dallekit.generation.evaluate import evaluate, held_out_captions
    from dallekit.generation.sample import sample
    from dallekit.models.clip import load_clip
    from dallekit.training.transformer import split_shards, train_transformer

    result: dict = {}
    with timer.step("train"):
        result["train"] = train_transformer(d["tokens"], d["model"], replace(p.train, resume=_checkpoint_exists(d["model"])))
    if p.train.val:
        val_paths = list_shards(p.train.val)
    else:  # the shards the trainer held out
        token_paths = list_shards(d["tokens"])
        val_paths = split_shards(token_paths, p.train.val_fraction, p.train.seed)[1] or token_paths
    scorer = load_clip(p.filter.clip_model, p.filter.clip_pretrained, p.filter.clip_checkpoint) if p.filter.clip else None
    if "sample" in steps and not (Path(d["samples"]) / "samples.jsonl").exists():
        prompts = p.sample.prompts or held_out_captions(val_paths, 16)
        with timer.step("sample"):
            sample(d["model"], dvae_dir, prompts, d["samples"], p.sample, scorer, judge=judge)
    if "evaluate" in steps:
        eval_file = Path(d["eval"]) / "eval.json"
        if scorer is None:
            print("run: evaluate skipped: it needs a CLIP ([filter] clip = true, or [run] train_clip = true)")
        elif eval_file.exists():
            result["evaluate"] = json.loads(eval_file.read_text())
        else:
            with timer.step("evaluate"):
                result["evaluate"] = evaluate(d["model"], dvae_dir, val_paths, d["eval"], scorer, p.evaluate, judge=judge)
    return result
