"""Semantic dedup after SemDeDup (Abbas et al. 2023): k-means on CLIP image embeddings, then cosines within each cluster.

The rule. Within a cluster, rows are in keep order: `keep="centroid"`, the highest cosine to
the cluster's centroid first; `keep="clip_score"`, the highest CLIP score (image . text) first;
ties by uid. A row is a `semantic_duplicate` when some row before it in its cluster has a cosine
above 1 - eps; its `duplicate_of` is the first such row and `semantic_similarity` the cosine to
it. That row may itself be a duplicate of another (a chain a ~ b ~ c where a and c are not
within eps drops b and c: SemDeDup's rule, not a keep-first walk), and of every group of rows
within eps of each other exactly the first in keep order is kept. Because the rule only asks
"is there an earlier row within eps, and which is the first", it is a max over pairs: no
sequential walk, so a cluster can be split into blocks compared pair by pair.

The passes, each a module, each `passes.run_pass` over `<scratch>/semdedup` (resumable: a rerun
skips the tasks whose marks vouch for their files):

1. `eligible` (a task per shard): which rows take part (the caller's rule), their count;
2. `kmeans` (one task): two-level spherical k-means (faiss) on at most `sample` rows;
3. `assign` (a task per shard): each row's cluster and keep score, shuffled to cluster groups;
4. `pairs` (a task per <= pair_rows rows of whole clusters, or per block pair of a larger one):
   each row's best earlier neighbour above the threshold, shuffled back by shard;
5. `final` (a task per shard): the best candidate per row, to `<scratch>/semantic/<shard>.parquet`.

Bounds: a task holds one shard, the sample, or at most about pair_rows rows plus one shuffle
part; cosines are computed CHUNK_CELLS at a time. The driver holds counts per shard and per
cluster and the k centroids, never rows. The run's own marks (its parameters when it starts, its
result, vouching for every output file, when it ends) answer a rerun with the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dallekit.errors import BadInputError
from dallekit.pipeline.dedup.state import RUN_PASS, DedupRun, claim_run, consumer_items
from dallekit.pipeline.passes import clear_marks, parts_for_consumers, read_marks, write_mark
from dallekit.pipeline.semdedup.assign import assign_task
from dallekit.pipeline.semdedup.columns import KEEP_CHOICES, OUTPUT_SCHEMA, REASON
from dallekit.pipeline.semdedup.eligible import Eligibility, eligible_task
from dallekit.pipeline.semdedup.final import final_task
from dallekit.pipeline.semdedup.kmeans import MIN_POINTS_PER_CENTROID, kmeans_task, load_centroids
from dallekit.pipeline.semdedup.pairs import CHUNK_CELLS, pairs_task, plan_pairs

__all__ = ["CHUNK_CELLS", "KEEP_CHOICES", "OUTPUT_SCHEMA", "REASON", "SemanticParams", "semantic_dedup", "semantic_path"]

TARGET_CLUSTER_ROWS = 2_000  # auto k = eligible rows / this: the cosines per row stay constant as the data grows
PAIR_ROWS = 20_000  # rows one pairs task holds at most (a larger cluster is split into blocks)
PASSES = ("eligible", "kmeans", "assign", "pairs", "final")
DATA_FOLDERS = ("eligible", "kmeans", "assigned", "rows", "pairs")


@dataclass(frozen=True)
class SemanticParams:
    """What the result depends on, besides the shards and who is eligible."""

    eps: float  # a row within cosine 1 - eps of an earlier row of its cluster is a duplicate
    clusters: int | None = None  # k; None: eligible rows / TARGET_CLUSTER_ROWS
    keep: str = "centroid"  # "centroid" or "clip_score": which row of a group is kept
    sample: int = 100_000  # rows k-means trains on at most
    seed: int = 0
    pair_rows: int = PAIR_ROWS
    eligible_id: Any = None  # what decides eligibility (the filter's options), so that another rule starts afresh


def _state_dir(scratch: str) -> str:
    return f"{scratch.rstrip('/')}/semdedup"


def semantic_path(scratch: str, name: str) -> str:
    """Where the run writes one input shard's clusters and duplicates."""
    return f"{scratch.rstrip('/')}/semantic/{name}.parquet"


def choose_clusters(params: SemanticParams, rows: int) -> int:
    """k: the given count, or rows / TARGET_CLUSTER_ROWS within what the sample can place; bad input naming the option."""
    if rows == 0:
        raise BadInputError("semantic dedup: no row takes part (none passes the other rules); nothing to cluster")
    sampled = min(rows, params.sample)
    if params.clusters is None:
        return int(max(1, min(round(rows / TARGET_CLUSTER_ROWS), sampled // MIN_POINTS_PER_CENTROID)))
    if params.clusters > rows:
        raise BadInputError(f"--semantic-dedup-clusters {params.clusters}: expected at most the {rows} rows that take part")
    most = max(1, sampled // MIN_POINTS_PER_CENTROID)
    if params.clusters > most:
        hint = "; raise --semantic-dedup-sample" if sampled < rows else ""  # with every row sampled, only fewer clusters help
        raise BadInputError(f"--semantic-dedup-clusters {params.clusters}: expected at most {most} "
                            f"({MIN_POINTS_PER_CENTROID} sampled rows per centroid, {sampled} sampled){hint}")
    return params.clusters


def semantic_dedup(client: Any, shards: list[tuple[str, str]], scratch: str, params: SemanticParams,
                   eligible: Eligibility | None = None) -> dict:
    """Semantic duplicates among the eligible rows of embeddings shards [(name, path)]; writes semantic_path(scratch, name), returns the stats.

    `eligible(name, uids)` gives a bool mask per embeddings shard (None: every row takes part); it
    runs in the tasks, so it must pickle. `client` None runs every task here.
    """
    if params.keep not in KEEP_CHOICES:
        raise BadInputError(f"--semantic-dedup-keep {params.keep}: expected one of {', '.join(KEEP_CHOICES)}")
    state_dir = _state_dir(scratch)
    done = claim_run(state_dir, {"shards": shards, "params": asdict(params) | {"eligible_id": repr(params.eligible_id)},
                              "filtered": eligible is not None})
    if done is not None:
        return done
    names = [name for name, _ in shards]
    run = DedupRun(client, state_dir, scratch, names, [[s] for s in range(len(names))], params.pair_rows,
                   label="semantic dedup", data_folders=DATA_FOLDERS)
    stats = _passes(run, shards, params, eligible)
    outputs = [semantic_path(scratch, name) for name in names]
    write_mark(state_dir, "result", stats, outputs, RUN_PASS)
    run.forget()
    return stats


def _passes(run: DedupRun, shards: list[tuple[str, str]], params: SemanticParams, eligible: Callable | None) -> dict:
    """The five passes in order; the run's stats."""
    filtered, state_dir = eligible is not None, run.state_dir
    counted = run.run("eligible", eligible_task, {name: (name, path) for name, path in shards}, state_dir=state_dir, eligible=eligible)
    rows = [r["rows"] for r in counted]
    k = choose_clusters(params, sum(rows))
    if not read_marks(state_dir, "kmeans"):  # new centroids: nothing assigned to older ones may stand
        for later in PASSES[2:]:
            clear_marks(state_dir, later)
    trained = run.run("kmeans", kmeans_task, {"0": {"clusters": k, "sample": params.sample, "seed": params.seed}}, state_dir=state_dir,
                      shards=[(name, path, n) for (name, path), n in zip(shards, rows)], filtered=filtered, group_rows=params.pair_rows)[0]
    assigned = run.run("assign", assign_task, {name: (s, name, path) for s, (name, path) in enumerate(shards)},
                       state_dir=state_dir, filtered=filtered, keep=params.keep)
    centroids = load_centroids(state_dir)
    sizes = np.zeros(len(centroids["fine"]), np.int64)
    for result in assigned:
        np.add.at(sizes, np.asarray(result["clusters"], np.int64), np.asarray(result["sizes"], np.int64))
    refs = parts_for_consumers(assigned, "rows")
    specs = plan_pairs(sizes, centroids["group_of"], params.pair_rows)
    paired = run.run("pairs", pairs_task, {spec["key"]: (spec, {"rows": refs.get(str(spec["group"]), [])}) for spec in specs},
                     state_dir=state_dir, dim=centroids["fine"].shape[1], threshold=1 - params.eps)
    found = run.run("final", final_task, consumer_items(range(len(shards)), candidates=parts_for_consumers(paired, "candidates")),
                    state_dir=state_dir, names=run.names, out_dir=f"{run.work_dir.rstrip('/')}/semantic")
    return {"rows": sum(rows), "clusters": trained["clusters"], "coarse_clusters": trained["coarse"], "sampled": trained["sampled"],
            "largest_cluster": int(sizes.max()), "pairs_tasks": len(specs), "split_clusters": int((sizes > params.pair_rows).sum()),
            "compared_pairs": int((sizes * (sizes - 1) // 2).sum()), "candidates": sum(r["candidates"] for r in paired),
            "duplicates": sum(r["duplicates"] for r in found), "duplicates_per_shard": {n: r["duplicates"] for n, r in zip(run.names, found)},
            "pass_seconds": run.seconds}
