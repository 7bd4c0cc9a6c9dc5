"""The stage contract: a stage declares what it is, and `run_plan` does everything around its shard function.

A `Stage` is data: its name, the stages whose output it reads, the columns it needs, its reject
reasons in funnel order and the function that computes one output shard. A stage module turns
its inputs and options into a `Plan` before any cluster starts (so bad input fails first); the
runner then owns the rest, the same for every stage:

1. take the folder's lease and claim `--out` (`begin_stage`): an identical finished run whose
   shards are whole returns its stats, a run with other inputs or options is refused;
2. the plan's global pass, when it has one (work over all shards, such as clean's dedup), as
   engine passes in the scratch folder: a rerun skips their tasks whose marks vouch for whole files;
3. one task per output shard (`run_stage`, a pass of the engine): atomic shards, rejects, marks,
   `_stats.json`, `_SUCCESS`;
4. `_work/` removed, and the funnel printed and saved for stages with rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dallekit.errors import BadInputError
from dallekit.io import check_columns, list_shards, shard_stem
from dallekit.pipeline.funnel import write_funnel
from dallekit.pipeline.passes import claim_work_dir, hold_folder, remove_work_dir
from dallekit.pipeline.registry import STAGES  # noqa: F401 (the one list of stages, also read from here)
from dallekit.pipeline.shards import ShardResult, ShardTask, begin_stage, check_output_folder, input_identity, run_stage


@dataclass(frozen=True)
class Stage:
    """What a pipeline stage is; `run_plan` does the rest."""

    name: str  # its folders' stage name, progress bars and messages
    upstream: tuple[str, ...]  # the stages whose finished output it reads; () when it reads raw inputs
    columns: frozenset[str]  # input columns every shard must have
    expected: str  # the input as an error names it: "shards from `dallekit download`"
    process: Callable[[Any], ShardResult]  # one output shard's work, run as a Dask task
    rules: tuple[str, ...] | None = None  # its reject reasons in funnel order; None: no funnel
    parquet_kwargs: dict = field(default_factory=dict)  # how its shards are written

    def input_of(self, input_dir: str, finished: bool = True) -> tuple[dict, list[str], list[int]]:
        """(identity, shard paths, rows per shard) of the input folder, checked: a finished upstream stage with the columns.

        With `finished=False` a folder of hand-made shards is accepted too (download's URL shards).
        """
        identity = input_identity(input_dir, self.upstream, required=finished)
        paths = list_shards(input_dir)
        rows = [n for _, n in check_columns(paths, set(self.columns), self.expected)]
        return identity, paths, rows


@dataclass
class Plan:
    """One run of a stage, known before any cluster starts: what its output depends on, and how to make its shards."""

    inputs: list[str]  # the folders and files it reads (`--out` may be none of them)
    fingerprint: dict  # what the output depends on: input identities and the options that change it
    stats_config: dict  # the options as `_stats.json` records them
    tasks: Callable[[Any, str], list[ShardTask]]  # (the global pass's result or None, output_dir) -> the shard tasks
    global_pass: Callable[[Any, str], Any] | None = None  # work over all shards before the shard tasks: (client, output_dir) -> a JSON-able result, once per output


def shard_tasks(paths: list[str], payload: Callable[[str], Any]) -> list[ShardTask]:
    """One task per input shard, named as the shard it reads."""
    return [ShardTask(shard_stem(p), payload(p)) for p in paths]


# The installed distributions whose upgrades can change a stage's output rows (decoders, resizers,
# caption repair, language ID, CLIP, torch kernels). Their versions are part of the fingerprint and
# of _stats.json: a resume under other versions is refused like an option change.
OUTPUT_PACKAGES = {
    "ingest": (),
    "download": ("img2dataset", "pillow", "opencv-python-headless"),
    "adopt": ("pillow",),
    "clean": ("ftfy", "pillow", "opencv-python-headless"),
    "filter": ("py3langid", "ftfy", "pillow", "opencv-python-headless", "open_clip_torch", "torch"),
    "embed": ("pillow", "opencv-python-headless", "open_clip_torch", "torch"),
    "encode": ("pillow", "torch", "tokenizers", "open_clip_torch", "ftfy"),  # the default text tokenizer is open_clip's BPE
}


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def check_worker_versions(client: Any, stage: str, versions: dict[str, str | None]) -> None:
    """Bad input when a Dask worker has other versions of the output's packages than the driver recorded."""
    if client is None or not versions:
        return
    for worker, theirs in client.run(package_versions, tuple(versions)).items():
        differing = [f"{name} {theirs.get(name)} (driver {mine})" for name, mine in versions.items() if theirs.get(name) != mine]
        if differing:
            raise BadInputError(f"{stage}: Dask worker {worker} has {', '.join(differing)}; "
                                "install the driver's versions on every worker, so the output does not depend on where a shard ran")


def run_plan(stage: Stage, plan: Plan, output_dir: str, client: Any, overwrite: bool = False) -> dict:
    """Run a planned stage into `output_dir` (resuming what an earlier run finished); returns its stats."""
    versions = package_versions(OUTPUT_PACKAGES.get(stage.name, ()))
    check_output_folder(output_dir, plan.inputs)
    with hold_folder(output_dir, stage.name):  # one writer per folder, an --overwrite included
        done = begin_stage(stage.name, output_dir, plan.fingerprint | {"versions": versions}, plan.inputs, overwrite)
        if done is not None:
            return done
        check_worker_versions(client, stage.name, versions)
        return _run_claimed(stage, plan, output_dir, client, versions)


def _run_claimed(stage: Stage, plan: Plan, output_dir: str, client: Any, versions: dict) -> dict:
    """The stage's passes in a folder this run holds: the plan's pass over all shards, the shards, the funnel."""
    started = time.time()
    claim_work_dir(output_dir)
    # Always run: its passes skip their tasks whose marks vouch for whole files and redo the rest, so
    # a scratch file deleted after the pass still gets rewritten before a shard task reads it.
    prepared = None if plan.global_pass is None else json.loads(json.dumps(plan.global_pass(client, output_dir)))
    # a one-number result (clean's marked rows, filter's global CLIP threshold) is worth keeping; ingest's rows per block are not
    scalar = isinstance(prepared, (int, float, str)) and not isinstance(prepared, bool)
    config = plan.stats_config | ({"prepared": prepared} if scalar else {}) | {"versions": versions}
    stats = run_stage(stage, output_dir, plan.tasks(prepared, output_dir), client, config=config, started=started)
    remove_work_dir(output_dir)
    if stage.rules is not None:
        print(write_funnel(output_dir, stage.name, stats, list(stage.rules)))
    return stats


def stage_named(name: str) -> tuple[Stage, Callable[..., Plan]]:
    """A stage and its plan function, from its entry of STAGES (`pipeline/registry.py`)."""
    import importlib

    module = importlib.import_module(STAGES[name].module)
    return module.STAGE, getattr(module, f"plan_{STAGES[name].python_name}")
