"""`dallekit run --config pipeline.toml`: every step of a run as one job on one Dask cluster.

The TOML file has one section per step, named like its subcommand (`[ingest]`, `[download]`,
`[clean]`, `[train-clip]`, `[embed]`, `[filter]`, `[train-tokenizer]` (or its old name `[train-dvae]`), `[encode]`, `[train]`, `[sample]`,
`[evaluate]`), plus `[cluster]` and `[run]` (the run folder, the inputs, which steps run).
Steps run in that order; train-clip only with `[run] train_clip = true`, when the CLIP trained
on the cleaned pairs replaces [filter]'s CLIP for filtering, reranking and evaluation; embed
only with [filter] clip on or semantic_dedup_eps set: it embeds the cleaned rows once with the
filter's CLIP (its own section sets how, never which CLIP), and the filter reads its CLIP scores
and the semantic dedup's vectors from that folder.
The run folder gets one sub-folder per step (DESIGN.md) and `report.html`. The steps are one
table, RUN_STEP_TABLE: each Dask stage is a `stage_step` over its entry of pipeline.stage.STAGES.

Rerunning the same command resumes: complete stages are skipped, a stage's complete shards are
kept, the trainers continue from their last checkpoint, and steps with a finished output
(tokenizer, CLIP, samples, evaluation) are not redone.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dallekit import config
from dallekit.config import RUN_STEPS, build_config
from dallekit.errors import BadInputError
from dallekit.io import iter_captions, list_shards
from dallekit.jobs.report import write_report
from dallekit.jobs.timing import StepTimer
from dallekit.pipeline.cluster import LazyClient
from dallekit.pipeline.ingest import plan_ingest
from dallekit.pipeline.shards import format_summary
from dallekit.pipeline.stage import STAGES

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
    embed: config.EmbedConfig
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
    pipeline = Pipeline(**configs)  # an empty [run] inputs is refused by its option check
    check_embed_clip(toml.get("embed") or {}, pipeline, where)
    return pipeline


EMBED_CLIP_OPTIONS = ("clip_model", "clip_pretrained", "clip_checkpoint")


def run_filter_clip(p: Pipeline) -> config.FilterConfig:
    """[filter] as the run uses it: with `[run] train_clip`, the CLIP the run trains replaces [filter]'s."""
    if not p.run.train_clip:
        return p.filter
    clip = run_folders(p.run.out)["clip"]
    return replace(p.filter, clip=True, clip_model=p.train_clip.model, clip_pretrained=None, clip_checkpoint=clip)


def check_embed_clip(section: dict, p: Pipeline, where: str) -> None:
    """Bad input when [embed] names another CLIP than the filter's: the run embeds with the filter's, so the two cannot differ."""
    used = run_filter_clip(p)
    for name in EMBED_CLIP_OPTIONS:
        if name in section and section[name] != getattr(used, name):
            whose = "the CLIP [run] train_clip trains" if p.run.train_clip else "[filter]'s"
            raise BadInputError(f"{where} [embed]: {name} = {section[name]!r}, but the run embeds with {whose} "
                                f"({name} = {getattr(used, name)!r}); set the CLIP in [filter] only")


def run_folders(out: str) -> dict[str, str]:
    """Where each step writes inside a run folder (DESIGN.md's layout)."""
    names = ["ingest", "download", "clean", "embed", "filter", "tokenizer", "bpe", "tokens", "model", "clip", "samples", "eval"]
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
    steps = RUN_STEPS[: RUN_STEPS.index(current_step_name(p.run.stop_after)) + 1]
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


def current_step_name(name: str) -> str:
    """A step's current name (train-dvae is train-tokenizer's old one)."""
    return "train-tokenizer" if name == "train-dvae" else name


def _checkpoint_exists(folder: str) -> bool:
    return (Path(folder) / "checkpoint" / "state.json").exists()


@dataclass
class RunState:
    """What the steps of one run share: the pipeline, its folders, the cluster, the results so far."""

    pipeline: Pipeline
    folders: dict[str, str]
    client: LazyClient
    timer: StepTimer
    judge: PixelJudge | None
    plans: dict[str, typing.Any]  # stages planned before the cluster starts (ingest: bad input fails first)
    result: dict = field(default_factory=lambda: {"stages": []})

    @property
    def tokenizer_dir(self) -> str:
        """The image tokenizer a run encodes with: [run] dvae, or the one it trains."""
        return self.pipeline.run.dvae or self.folders["tokenizer"]

    @property
    def encode_config(self) -> config.EncodeConfig:
        """[encode], with the BPE the run trains as its text tokenizer when [run] bpe_vocab_size is set."""
        return replace(self.pipeline.encode, text_tokenizer=self.folders["bpe"]) if self.pipeline.run.bpe_vocab_size else self.pipeline.encode

    @property
    def embed_config(self) -> config.EmbedConfig:
        """[embed], with the filter's CLIP (the run's own when it trains one): the filter reads these embeddings' scores."""
        f = self.pipeline.filter
        return replace(self.pipeline.embed, clip_model=f.clip_model, clip_pretrained=f.clip_pretrained, clip_checkpoint=f.clip_checkpoint)

    @property
    def filter_config(self) -> config.FilterConfig:
        """[filter], reading its CLIP scores (and the semantic dedup its vectors) from the run's embeddings."""
        f = self.pipeline.filter
        return replace(f, embeddings=self.folders["embed"]) if reads_embeddings(f) else f

    @functools.cached_property
    def val_paths(self) -> list[str]:
        """The validation token shards: [train] val, or the shards the trainer held out."""
        from dallekit.training.transformer import split_shards

        if self.pipeline.train.val:
            return list_shards(self.pipeline.train.val)
        token_paths = list_shards(self.folders["tokens"])
        return split_shards(token_paths, self.pipeline.train.val_fraction, self.pipeline.train.seed)[1] or token_paths

    @functools.cached_property
    def scorer(self):
        """The CLIP that reranks samples and scores the evaluation ([filter]'s, or the run's own), None without one."""
        from dallekit.models.clip import load_clip

        f = self.pipeline.filter
        return load_clip(f.clip_model, f.clip_pretrained, f.clip_checkpoint) if f.clip else None


@dataclass(frozen=True)
class Step:
    """One step of `dallekit run`: a Dask stage from pipeline.stage.STAGES, or work in this process (a trainer, sampling, the report)."""

    name: str  # as in [run] stop_after (config.RUN_STEPS) and timings.json
    work: Callable[[RunState], None]
    needed: Callable[[RunState], bool] = lambda state: True  # False: skipped (not asked for, or its output is complete)
    dask: bool = False  # runs on the cluster; before any other step the cluster is stopped, so the driver has the cores


def stage_step(name: str, inputs: Callable[[RunState], list], folder: str | None = None,
               options: Callable[[RunState], typing.Any] | None = None,
               needed: Callable[[RunState], bool] = lambda state: True) -> Step:
    """The Dask stage `name` (an entry of STAGES) as a step: `inputs` gives its input arguments in a run, `folder` its output
    folder in run_folders (default: its name), `options` its config (default: its section) and `needed` whether it runs."""
    options = options or (lambda state: getattr(state.pipeline, name))

    def work(state: RunState) -> None:
        entry = getattr(importlib.import_module(STAGES[name].module), STAGES[name].python_name)  # each stage module's function named after the stage
        out = state.folders[folder or name]
        with state.timer.step(name, state.client):
            stats = entry(*inputs(state), out, options(state), state.client, plan=state.plans.get(name))
        state.result["stages"].append(stats)

    return Step(name, work, needed, dask=True)


def _train_clip(state: RunState) -> None:
    from dallekit.training.clip import train_clip

    with state.timer.step("train-clip"):
        state.result["train-clip"] = train_clip(state.folders["clean"], state.folders["clip"], state.pipeline.train_clip)


def _train_tokenizer(state: RunState) -> None:
    from dallekit.training.tokenizer import train_tokenizer

    folder = state.folders["tokenizer"]
    with state.timer.step("train-tokenizer"):
        options = replace(state.pipeline.train_tokenizer, resume=_checkpoint_exists(folder))
        state.result["tokenizer"] = train_tokenizer(state.folders["filter"], folder, options)


def _train_bpe(state: RunState) -> None:
    from dallekit.tokenize.text import train_bpe

    with state.timer.step("train-bpe"):
        train_bpe(iter_captions(state.folders["filter"]), state.folders["bpe"], vocab_size=state.pipeline.run.bpe_vocab_size)


def _train(state: RunState) -> None:
    from dallekit.training.transformer import train_transformer

    folder = state.folders["model"]
    with state.timer.step("train"):
        state.result["train"] = train_transformer(state.folders["tokens"], folder, replace(state.pipeline.train, resume=_checkpoint_exists(folder)))


def _sample(state: RunState) -> None:
    from dallekit.generation.evaluate import held_out_captions
    from dallekit.generation.sample import sample

    prompts = state.pipeline.sample.prompts or held_out_captions(state.val_paths, 16)
    with state.timer.step("sample"):
        sample(state.folders["model"], state.tokenizer_dir, prompts, state.folders["samples"], state.pipeline.sample, state.scorer, judge=state.judge)


def _evaluate(state: RunState) -> None:
    from dallekit.generation.evaluate import evaluate

    eval_file = Path(state.folders["eval"]) / "eval.json"
    if state.scorer is None:
        print("run: evaluate skipped: it needs a CLIP ([filter] clip = true, or [run] train_clip = true)")
    elif eval_file.exists():
        state.result["evaluate"] = json.loads(eval_file.read_text())
    else:
        with state.timer.step("evaluate"):
            state.result["evaluate"] = evaluate(state.folders["model"], state.tokenizer_dir, state.val_paths, state.folders["eval"],
                                                state.scorer, state.pipeline.evaluate, judge=state.judge)


def _report(state: RunState) -> None:
    state.timer.save(state.pipeline.run.out)  # the report's time table reads timings.json
    print(f"run: report in {write_report(state.pipeline.run.out)}")


def _missing(folder: str, name: str) -> Callable[[RunState], bool]:
    """Needed while the step's finished file `name` is not in its folder."""
    return lambda state: not (Path(state.folders[folder]) / name).exists()


def reads_embeddings(f: config.FilterConfig) -> bool:
    """Whether the run's filter reads the embed step's output: for its CLIP scores or its semantic dedup."""
    return f.clip or f.semantic_dedup_eps is not None


# Every step of `dallekit run`, in order (the names of config.RUN_STEPS). A Dask stage is one entry
# of pipeline.stage.STAGES and one stage_step here; a step in this process is a function and an entry.
RUN_STEP_TABLE = [
    stage_step("ingest", lambda state: [state.pipeline.run.inputs]),
    stage_step("download", lambda state: [state.folders["ingest"]]),
    stage_step("clean", lambda state: [state.folders["download"]]),
    Step("train-clip", _train_clip, lambda state: state.pipeline.run.train_clip and _missing("clip", "open_clip_model.safetensors")(state)),
    stage_step("embed", lambda state: [state.folders["clean"]], options=lambda state: state.embed_config,
               needed=lambda state: reads_embeddings(state.pipeline.filter)),
    stage_step("filter", lambda state: [state.folders["clean"]], options=lambda state: state.filter_config),
    Step("train-tokenizer", _train_tokenizer, lambda state: state.pipeline.run.dvae is None),
    Step("train-bpe", _train_bpe, lambda state: bool(state.pipeline.run.bpe_vocab_size) and _missing("bpe", "tokenizer.json")(state)),
    stage_step("encode", lambda state: [state.folders["filter"], state.tokenizer_dir], "tokens", lambda state: state.encode_config),
    Step("train", _train),
    Step("sample", _sample, _missing("samples", "samples.jsonl")),
    Step("evaluate", _evaluate),
    Step("report", _report),
]


def run_pipeline(p: Pipeline, judge: PixelJudge | None = None, timer: StepTimer | None = None) -> dict:
    """Run (or resume) every step up to `run.stop_after`; returns each Dask stage's stats, the final metrics and the step timings."""
    last = [s.name for s in RUN_STEP_TABLE].index(current_step_name(p.run.stop_after))
    folders = run_folders(p.run.out)
    p = replace(p, filter=run_filter_clip(p))  # with [run] train_clip, the CLIP trained on the cleaned pairs embeds, filters and reranks
    check_run_folder(p.run.out)
    check_run_models(p)
    Path(p.run.out).mkdir(parents=True, exist_ok=True)
    plans = {"ingest": plan_ingest(p.run.inputs, p.ingest)}  # bad input fails before a cluster starts
    timer = timer or StepTimer()
    steps = RUN_STEP_TABLE[: last + 1]
    last_stage = max(i for i, s in enumerate(steps) if s.dask)
    with LazyClient(p.cluster) as client:
        state = RunState(p, folders, client, timer, judge, plans)
        for i, step in enumerate(steps):
            if step.needed(state):
                if not step.dask:
                    client.stop()  # the trainers run in this process: idle workers would take CPU and memory from them
                step.work(state)
            if i == last_stage:
                client.stop()
                for stats in state.result["stages"]:
                    print(format_summary(stats))
    state.result["timings"] = timer.rows
    timer.save(p.run.out)
    return state.result
