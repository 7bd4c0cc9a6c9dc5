"""One dedup run's passes on the engine (`pipeline/passes.py`): resumable tasks, their shuffles' inputs, and what is dropped when.

Every pass is `passes.run_pass` over the dedup state folder (`<stage scratch>/dedup`), so each
task's mark vouches for the files it wrote and a rerun redoes a task whose output is missing or
truncated. Once every consumer of a pass is done, its files are dropped (`passes.drop_outputs`):
at 16M rows the intermediates are larger than the scans. A task to redo whose inputs were
dropped already (a pass's output damaged after its producers' were consumed) cannot be redone
alone: the run then starts over (`InputsGone`), which gives the same result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from dallekit.pipeline.passes import clear_marks, drop_outputs, read_marks, run_pass, write_mark

# Every data folder a run writes in its state folder; all are removed once the run's result is recorded.
DATA_FOLDERS = ("by_uid", "by_sha256", "survivors", "marks", "by_image", "representatives", "members", "table_entries",
                "candidates", "pairs", "confirmed_edges", "components", "walk_input")


class InputsGone(Exception):
    """A task must be redone but a shuffle part it reads was dropped (or damaged) after its producer's pass was consumed."""


def consumer_items(keys: Any, **inputs: dict[str, list]) -> dict[str, tuple[Any, dict[str, list]]]:
    """Consumer tasks: key -> (key, the parts of each input kind its producers wrote for it)."""
    return {str(key): (key, {kind: refs.get(str(key), []) for kind, refs in inputs.items()}) for key in keys}


def _parts_whole(payload: Any) -> bool:
    """Whether every shuffle part a consumer task reads is on disk (its file at least as long as the part's end)."""
    if not (isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[1], dict)):
        return True
    for refs in payload[1].values():
        for path, offset, length, _ in refs:
            fs, p = fsspec.core.url_to_fs(path)
            try:
                if fs.size(p) < offset + length:
                    return False
            except (FileNotFoundError, OSError):
                return False
    return True


@dataclass
class DedupRun:
    """One dedup run: the client, the state folder, the stage's scratch folder, the shards and their groups."""

    client: Any
    state_dir: str  # <scratch>/dedup: the passes' files and marks
    work_dir: str  # the stage's scratch folder: scan/<shard>.parquet in, dups/<shard>.parquet out
    names: list[str]
    groups: list[list[int]]
    rows_per_task: int
    seconds: dict[str, list] = field(default_factory=dict)  # per pass: wall time, summed task time (this run's tasks)
    label: str = "dedup"  # the progress bars' name of the run (semantic dedup reuses this class)
    data_folders: tuple[str, ...] = DATA_FOLDERS  # what `forget` removes from the state folder

    @property
    def group_of(self) -> list[int]:
        """The group of each shard."""
        out = [0] * len(self.names)
        for g, shards in enumerate(self.groups):
            for s in shards:
                out[s] = g
        return out

    def run(self, pass_name: str, task: Callable, items: dict[str, Any], **kwargs: Any) -> list[dict]:
        """task(payload, **kwargs) for every item not vouched for by its mark; every item's result, in item order.

        Raises InputsGone when a task to redo reads a part that is no longer whole.
        """
        done = read_marks(self.state_dir, pass_name)  # drops the marks of damaged outputs
        pending = [key for key in items if key not in done]
        if not all(_parts_whole(items[key]) for key in pending):
            raise InputsGone(f"a task of pass {pass_name} must be redone and its inputs were already consumed")
        start = time.perf_counter()
        found = run_pass(self.client, self.state_dir, pass_name, task, items, desc=f"{self.label} {pass_name}", **kwargs)
        self.seconds[pass_name] = [round(time.perf_counter() - start, 2), round(sum(found[key]["task_seconds"] for key in pending), 2)]
        return [found[key] for key in items]

    def drop(self, pass_name: str, *folders: str) -> None:
        """Delete a pass's data folders that no later pass reads (its marks stay, no longer re-checked)."""
        drop_outputs(self.state_dir, pass_name, *folders)

    def forget(self) -> None:
        """Remove every pass's marks and data folder: the run's recorded result now answers a rerun."""
        for pass_name in self.seconds:
            clear_marks(self.state_dir, pass_name)
        fs, root = fsspec.core.url_to_fs(self.state_dir)
        for folder in self.data_folders:
            if fs.exists(f"{root}/{folder}"):
                fs.rm(f"{root}/{folder}", recursive=True)


RUN_PASS = "run"  # a dedup run's own marks: "params" when it starts, "result" when it is done


def claim_run(state_dir: str, params: dict) -> dict | None:
    """The result of a finished run with these parameters, or None; the state of a run with other parameters is removed.

    A result whose files are no longer whole is dropped by `read_marks`: the run is then redone.
    """
    params = json.loads(json.dumps(params))
    marks = read_marks(state_dir, RUN_PASS)
    if "params" in marks and marks["params"].result != params:
        remove_state(state_dir)
        marks = {}
    if "result" in marks:
        return marks["result"].result
    if "params" not in marks:
        write_mark(state_dir, "params", params, [], RUN_PASS)
    return None


def remove_state(state_dir: str) -> None:
    """Delete the whole state folder: every pass's files and marks."""
    fs, root = fsspec.core.url_to_fs(state_dir)
    if fs.exists(root):
        fs.rm(root, recursive=True)
