"""Distributed exact and near-duplicate marking for `dallekit clean`: no task, and not the driver, holds the dataset.

The result is the one of the sequential walk it replaces: the rows that survived the scan, in
uid order; a row whose sha256 equals an earlier surviving row's is a `duplicate_image` of the
first such row; otherwise a row is a `near_duplicate_image` when an earlier *kept* row (kept = not
rejected as either kind) has a pHash within `distance` bits, a colour thumbnail within
`max_color` and a detail thumbnail within `max_detail` (`detail_distance`), and its
`duplicate_of` is the nearest such kept row (fewest bits, then smallest uid).

The passes, in order, each a module documenting its own; each is `passes.run_pass` over the
state folder `<scratch>/dedup` (see `state`), so a rerun after a killed worker or driver skips
every task whose mark vouches for its files and writes the same files:

1-2.  `exact`: split (uids and surviving rows to hash buckets), exact (repeated uids, sha256 repeats);
3-6.  `candidates`: signatures, collapse (identical images to one representative),
      table_partition and tables (candidate pairs from permuted hash tables);
7-8.  `confirm`: pair_thumbnails, confirm (colour, then detail);
9.    `components`: components<r>, large-star / small-star rounds;
10-12. `walk`: gather, walk (each component in uid order), final (each shard's marks to `dups/`).

Cost per row: a few vectorised passes (hashing, sorting its bucket), (d+1) table entries of 16
bytes and C(k, d) sorts of 8-byte keys per representative; compared pairs are the true near
pairs plus about N/2^(key bits - log2 N + 1) <= N/8 random ones per table.

Bounds. Every bucket count is chosen here from counts alone (scan footers, per-task counts and
block histograms in the marks) so that a task holds about ROWS_PER_TASK rows or table entries;
the driver holds counts per shard, per bucket and per histogram bin, never per row. What one
key gathers cannot be split: all rows of one sha256, all representatives with one leading-block
value (one table range), all edges of one node, all nodes of one component. k is capped at 8
blocks: past N = 2^30 representatives (d = 4) the keys stop growing with log2 N and the random
pairs per table grow as N^2 / 2^(key bits); for d >= 8, k = d + 1 is forced and keys have
64/(d+1) bits.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow.parquet as pq

from dallekit.config import CleanConfig
from dallekit.pipeline.dedup.candidates import candidate_passes
from dallekit.pipeline.dedup.columns import REASON_EXACT, REASON_NEAR
from dallekit.pipeline.dedup.components import MAX_ROUNDS, connected_components
from dallekit.pipeline.dedup.confirm import confirm_passes
from dallekit.pipeline.dedup.exact import exact_passes
from dallekit.pipeline.dedup.state import RUN_PASS, DedupRun, InputsGone, claim_run, consumer_items, remove_state
from dallekit.pipeline.dedup.walk import final_task, walk_passes
from dallekit.pipeline.hash_blocks import choose_blocks
from dallekit.pipeline.passes import map_with_progress, parts_for_consumers, read_marks, write_mark

__all__ = ["MAX_ROUNDS", "REASON_EXACT", "REASON_NEAR", "ROWS_PER_TASK", "dedup", "dedup_stats"]

# The rows (or table entries) one task holds at most; one key heavier than this (one sha256,
# one block value, one component) stays in one task. Small enough that a worker's peak memory
# does not grow with the dataset: 1M rows already splits into buckets of this size.
ROWS_PER_TASK = 500_000


def _state_dir(work_dir: str) -> str:
    """The dedup's state folder inside the stage's scratch folder."""
    return f"{work_dir.rstrip('/')}/dedup"


def shard_groups(names: list[str], work_dir: str, rows_per_task: int) -> tuple[list[list[int]], int]:
    """Consecutive scan shards grouped to about rows_per_task rows (from the footers), and the total rows."""
    groups, rows, total = [[]], 0, 0
    for s, name in enumerate(names):
        fs, p = fsspec.core.url_to_fs(f"{work_dir}/scan/{name}.parquet")
        with fs.open(p, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        if groups[-1] and rows + n > rows_per_task:
            groups.append([])
            rows = 0
        groups[-1].append(s)
        rows, total = rows + n, total + n
    return groups, total


def dedup(client: Any, shard_names: list[str], work_dir: str, distance: int,
          max_color: float | None = CleanConfig.near_dup_color_distance,
          max_detail: float | None = CleanConfig.near_dup_detail_distance) -> dict[str, int]:
    """Mark exact and near duplicates over all scanned shards in distributed passes; writes <scratch>/dups/<shard>.parquet, returns marks per shard.

    When all rows fit one task, the passes run inside a single Dask task: the same files and
    marks, without a round trip per pass (~25 ms each, 18 passes: most of a 3,000-row clean).
    """
    state_dir = _state_dir(work_dir)
    params = {"shards": shard_names, "distance": distance, "max_color": max_color, "max_detail": max_detail}
    done = claim_run(state_dir, params)
    if done is not None:
        return done["marks"]
    groups, total = shard_groups(shard_names, work_dir, ROWS_PER_TASK)
    args = (state_dir, work_dir, shard_names, groups, total, params, ROWS_PER_TASK)
    if client is not None and total <= ROWS_PER_TASK:
        return map_with_progress(client, _every_pass_in_one_task, [args], desc="dedup")[0]
    return _every_pass(client, *args)


def _every_pass_in_one_task(args: tuple) -> dict[str, int]:
    """Every pass of a small run, in this worker."""
    return _every_pass(None, *args)


def _every_pass(client: Any, state_dir: str, work_dir: str, names: list[str], groups: list[list[int]], total: int,
                params: dict, rows_per_task: int) -> dict[str, int]:
    """The passes (as Dask tasks, or here when `client` is None), then the result mark; marks per shard.

    A task to redo whose inputs a finished pass already consumed starts the run over, once.
    """
    for attempt in range(2):
        run = DedupRun(client, state_dir, work_dir, names, groups, rows_per_task)
        try:
            return _passes(run, total, params)
        except InputsGone as gone:
            if attempt:
                raise RuntimeError(f"{state_dir}: {gone}, again after starting over") from gone
            print(f"{state_dir}: {gone}; starting the dedup over")
            remove_state(state_dir)
            write_mark(state_dir, "params", json.loads(json.dumps(params)), [], RUN_PASS)
    raise AssertionError("unreachable")


def _passes(run: DedupRun, total: int, params: dict) -> dict[str, int]:
    """Every pass in order, then the result mark (vouching for the dups files) and the state's removal; marks per shard."""
    distance = params["distance"]
    stats, exact = exact_passes(run, total, near=distance >= 0)
    marked = list(exact)
    if distance >= 0:
        buckets = stats["near_buckets"]
        k = choose_blocks(stats["survivors"], distance)  # from an upper bound of the representatives: any k finds every pair
        near_stats, tables = candidate_passes(run, exact, buckets, k, distance, params["max_color"])
        confirmed = confirm_passes(run, tables, buckets, params["max_color"], params["max_detail"])
        edges = sum(r["edges"] for r in confirmed)
        rounds, producer, stars = connected_components(run, buckets, confirmed)
        walk_stats, walk_marks = walk_passes(run, buckets, confirmed, (producer, stars), edges)
        stats |= near_stats | walk_stats | {"edges": edges, "components_rounds": rounds}
        marked += walk_marks
    found = run.run("final", final_task, consumer_items(range(len(run.groups)), marks=parts_for_consumers(marked, "marks")),
                    work_dir=run.work_dir, names=run.names, groups=run.groups)
    marks = {name: n for result in found for name, n in result["marks_per_shard"].items()}
    stats |= {"marks": sum(marks.values()), "pass_seconds": run.seconds}
    dups = [f"{run.work_dir.rstrip('/')}/dups/{name}.parquet" for name in run.names]
    write_mark(run.state_dir, "result", {"marks": marks, "stats": stats}, dups, RUN_PASS)
    run.forget()
    return {name: marks[name] for name in run.names}


def dedup_stats(work_dir: str) -> dict[str, int]:
    """The counts of a finished dedup run (rows, representatives, k, compared pairs, edges, rounds...)."""
    return read_marks(_state_dir(work_dir), RUN_PASS, verify=False, remove_damaged=False)["result"].result["stats"]
