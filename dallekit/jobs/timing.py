"""Where a run's time goes: wall and CPU seconds of each step, written to `timings.json` and shown in report.html.

CPU seconds are user + system time, which vary less than wall time on a shared machine: this
process's (the trainers run here), its finished child processes', and those of the Dask
workers (the stages run there), so idle workers that compete with a trainer show up in its row.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

TIMINGS_FILE = "timings.json"


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pid_and_cpu_seconds() -> tuple[int, float]:
    return os.getpid(), process_cpu_seconds()


def _workers_cpu(client) -> dict[int, float]:
    """CPU seconds of each Dask worker process by pid; in-process workers (this pid) are already counted."""
    if client is None:
        return {}
    try:
        answers = client.run(_pid_and_cpu_seconds).values()
    except Exception:  # noqa: BLE001 - a cluster going away mid-measurement costs the row its workers' share, not the run
        return {}
    return {pid: seconds for pid, seconds in answers if pid != os.getpid()}


class StepTimer:
    """Collects one row per step: {"step", "wall_s", "cpu_s"}."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str, client=None) -> Iterator[None]:
        """Time the block as step `name`; with a Dask client, its workers' CPU seconds count too."""
        workers = _workers_cpu(client)
        wall, cpu = time.perf_counter(), process_cpu_seconds()
        try:
            yield
        finally:
            worker_cpu = sum(max(0.0, now - workers.get(pid, 0.0)) for pid, now in _workers_cpu(client).items())
            self.rows.append({"step": name, "wall_s": round(time.perf_counter() - wall, 2),
                              "cpu_s": round(process_cpu_seconds() - cpu + worker_cpu, 2)})

    def add(self, name: str, wall_s: float, cpu_s: float) -> None:
        """A step timed elsewhere (the demo's data generation)."""
        self.rows.insert(0, {"step": name, "wall_s": round(wall_s, 2), "cpu_s": round(cpu_s, 2)})

    def save(self, run_dir: str) -> None:
        """Write the rows to `timings.json` in the run folder, atomically."""
        path = Path(run_dir) / TIMINGS_FILE
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
        tmp.replace(path)


def load_timings(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's `timings.json`, [] when it has none."""
    path = Path(run_dir) / TIMINGS_FILE
    return json.loads(path.read_text()) if path.exists() else []


TIMING_HEADER = ["step", "wall s", "CPU s", "CPU %"]


def timing_table(rows: list[dict]) -> list[list[str]]:
    """The rows as table cells (TIMING_HEADER's columns), with each step's share of the CPU seconds and a total row."""
    total_wall, total_cpu = sum(r["wall_s"] for r in rows), sum(r["cpu_s"] for r in rows)
    cells = [[r["step"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{100 * r['cpu_s'] / max(total_cpu, 1e-9):.1f}"] for r in rows]
    return cells + [["total", f"{total_wall:.1f}", f"{total_cpu:.1f}", "100.0"]]


def format_timings(rows: list[dict]) -> list[str]:
    """The timing table as aligned text lines."""
    return [f"{step:<12}{wall:>9}{cpu:>9}{share:>7}" for step, wall, cpu, share in [TIMING_HEADER, *timing_table(rows)]]
