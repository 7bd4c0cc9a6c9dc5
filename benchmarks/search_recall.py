"""dallekit index vs exact search (faiss IndexFlatIP) on synthetic CLIP-like vectors: recall@10, query latency, build time.

The vectors are 512-d unit vectors with CLIP's shape: a direction every embedding shares (random
pairs have cosine ~0.3), topics, sub-topics of a few dozen images each (near duplicates and
variants of one subject), and per-image detail. The queries are caption-like: a sub-topic's
centre moved by a shared "modality gap" and noise of their own, so a query's neighbours are
images of its sub-topic, as a text search's are. Both indexes are built from the same
embeddings folder (written here, shard by shard, as `dallekit embed` writes one); dallekit's
with a memory budget that rules out exact search (by default 1,000 bytes a vector, half of
what float32 vectors take), the peer exact.

dallekit's side is measured twice: the raw faiss index, and the search path a user gets
(`SearchIndex.nearest`, what `dallekit search` and `dallekit.search.open(INDEX).text()` run before
joining the hits to the stage's rows, which is not timed),
which asks the index for RERANK times k candidates and rescores them with the stored vectors.
Rounds alternate exact search, the raw index and the search path at query time (ABAB).
A `--work` folder that already holds the data and a finished index for these options is reused.

    python benchmarks/search_recall.py --rows 200000
    python benchmarks/search_recall.py --rows 1000000 --work /tmp/sr1m   # the README's figures

The last line is ratio=<the search path's recall@10 against exact search>, the target 0.95 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import alternate, print_rounds  # noqa: E402

DIM = 512
SHARD_ROWS = 50_000
LOCAL_DIM = 24
ROW_GROUP = 64  # `dallekit embed` writes a row group per CLIP batch (EmbedConfig.batch_size's default)


class Synthetic:
    """CLIP-like unit vectors: shared direction, topics, sub-topics, detail; caption-like queries near sub-topics."""

    def __init__(self, rows: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.shared = self._unit(rng.standard_normal(DIM))
        self.gap = self._unit(rng.standard_normal(DIM))  # captions and images differ by a constant offset in CLIP
        topics = max(8, rows // 5000)
        self.subtopics = max(16, rows // 40)
        topic_centres = self._unit(rng.standard_normal((topics, DIM)))
        parent = rng.integers(0, topics, self.subtopics)
        self.parent = parent
        self.local = self._unit(rng.standard_normal((topics, LOCAL_DIM, DIM)))  # each topic's directions of variation
        self.centres = self._unit(0.55 * self.shared + 0.6 * topic_centres[parent] + 0.45 * self._unit(rng.standard_normal((self.subtopics, DIM))))
        weights = rng.pareto(2.0, self.subtopics) + 1  # a few popular subjects, many rare ones
        self.weights = weights / weights.sum()

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def images(self, n: int) -> np.ndarray:
        """n image vectors: a sub-topic's centre plus detail."""
        which = self.rng.choice(self.subtopics, n, p=self.weights)
        return self._unit(self.centres[which] + 0.5 * self._detail(which) + 0.15 * self._unit(self.rng.standard_normal((n, DIM))))

    def _detail(self, which: np.ndarray) -> np.ndarray:
        """Variation along a few directions of each topic (CLIP's embeddings have an intrinsic dimension of a few dozen)."""
        coords = self.rng.standard_normal((len(which), LOCAL_DIM)).astype(np.float32)
        out = np.empty((len(which), DIM), np.float32)
        for lo in range(0, len(which), 2048):  # (rows, LOCAL_DIM, DIM) at a time: 100 MB, not gigabytes
            out[lo : lo + 2048] = np.einsum("nl,nld->nd", coords[lo : lo + 2048], self.local[self.parent[which[lo : lo + 2048]]])
        return self._unit(out)

    def queries(self, n: int) -> np.ndarray:
        """n caption-like queries: a sub-topic's centre, the modality gap and their own noise."""
        which = self.rng.choice(self.subtopics, n, p=self.weights)
        return self._unit(self.centres[which] + 0.3 * self.gap + 0.5 * self._detail(which) + 0.3 * self._unit(self.rng.standard_normal((n, DIM))))


def write_embeddings(folder: Path, data: Synthetic, rows: int) -> Path:
    """A filter-like stage folder (uid, caption) and its embeddings folder, shard by shard, as `dallekit embed` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dallekit.pipeline.embeddings import embedding_array, embedding_metadata, model_identity
    from dallekit.pipeline.shards import input_identity

    stage, embed = folder / "filter", folder / "embed"
    stage.mkdir(parents=True)
    embed.mkdir()
    identity = model_identity("ViT-B-32", "laion2b_s34b_b79k", None)
    for s, lo in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - lo)
        uids = [f"{i:016x}" for i in range(lo, lo + n)]
        pq.write_table(pa.table({"uid": uids, "caption": [f"image {i}" for i in range(lo, lo + n)]}), stage / f"part-{s:05d}.parquet")
        table = pa.table({"uid": uids, "image_embedding": embedding_array(data.images(n)), "text_embedding": embedding_array(data.queries(n))})
        pq.write_table(table.replace_schema_metadata(embedding_metadata(identity, DIM)), embed / f"part-{s:05d}.parquet",
                       row_group_size=ROW_GROUP)
    shards = len(list(stage.glob("part-*.parquet")))
    for path, name in ((stage, "filter"), (embed, "embed")):
        (path / "_stats.json").write_text(json.dumps({"stage": name, "shards": shards, "rows_in": rows, "rows_out": rows, "rows_rejected": 0}))
        (path / "_SUCCESS").write_text("")
    (embed / "_fingerprint.json").write_text(json.dumps({"input": input_identity(str(stage), ("filter",)), "model": identity}))
    return embed


def exact_index(embed: Path):
    """The peer: faiss's exact inner-product index over every vector, added shard by shard."""
    import faiss

    from dallekit.pipeline.embeddings import read_embeddings

    index = faiss.IndexFlatIP(DIM)
    for path in sorted(embed.glob("part-*.parquet")):
        index.add(read_embeddings(str(path))[1].astype(np.float32))
    return index


def reused_data(work: Path, rows: int) -> Path | None:
    """The embeddings folder of an earlier run in `work` when it finished with these rows, else None (and the partial data removed)."""
    embed = work / "data" / "embed"
    try:
        stats = json.loads((embed / "_stats.json").read_text())
        if (embed / "_SUCCESS").exists() and stats["rows_out"] == rows:
            return embed
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(work / "data", ignore_errors=True)
    return None


def reused_index(index_dir: Path, rows: int, budget: str, kind: str) -> dict | None:
    """index.json of a finished index in `index_dir` built with this budget and kind over these rows, else None."""
    from dallekit.errors import BadInputError
    from dallekit.search.choice import parse_memory
    from dallekit.search.query import check_current, read_info

    try:
        info = read_info(str(index_dir))
        check_current(str(index_dir), info)
    except BadInputError:
        return None
    same = info["rows"] == rows and info.get("max_memory") == parse_memory(budget) and kind in ("auto", info["kind"])
    return info if same else None


def timed_search(index, queries: np.ndarray, k: int, per_query: bool) -> tuple[np.ndarray, float]:
    """(ids, ms a query): one query at a time as a user's search runs, or the batch at once."""
    start = time.perf_counter()
    if per_query:
        ids = np.concatenate([index.search(q[None], k)[1] for q in queries])
    else:
        ids = index.search(queries, k)[1]
    return ids, 1000 * (time.perf_counter() - start) / len(queries)


def timed_nearest(searcher, queries: np.ndarray, k: int) -> tuple[list[np.ndarray], float]:
    """(each query's hit uids, ms a query) through SearchIndex.nearest, one query at a time as `dallekit search` runs."""
    start = time.perf_counter()
    uids = [searcher.nearest(q, k)["uid"].to_numpy() for q in queries]
    return uids, 1000 * (time.perf_counter() - start) / len(queries)


def prepared(args, work: Path, data: Synthetic) -> tuple[Path, dict, str]:
    """The embeddings folder, index.json and the build's time: reused from `work` when complete, else written and built."""
    import dallekit.search

    start = time.perf_counter()
    embed = reused_data(work, args.rows)
    if embed is None:
        embed = write_embeddings(work / "data", data, args.rows)
        print(f"data: {args.rows} vectors of {DIM} dimensions in {time.perf_counter() - start:.0f} s")
    else:
        print(f"data: {args.rows} vectors of {DIM} dimensions, reused from {embed}")
    budget = args.max_memory or str(1000 * args.rows)
    info = reused_index(work / "index", args.rows, budget, args.kind)
    if info is not None:
        print(f"index: reused from {work / 'index'}")
        return embed, info, f"{info['seconds']:.1f} s (as index.json records; reused)"
    start = time.perf_counter()
    info = dallekit.search.build_index(str(embed), str(work / "index"), budget, args.kind)
    return embed, info, f"{time.perf_counter() - start:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="vectors in the embeddings folder")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--max-memory", default=None, help="dallekit index's budget (default: 1,000 bytes a vector)")
    parser.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the data and index, reused when complete (default: a temporary one)")
    args = parser.parse_args()

    import dallekit.search
    from dallekit.search.build import ROWS_FILE, recall

    work = Path(args.work or tempfile.mkdtemp(prefix="search-recall-"))
    data = Synthetic(args.rows)
    embed, info, build_ours = prepared(args, work, data)
    start = time.perf_counter()
    peer = exact_index(embed)
    build_peer = time.perf_counter() - start
    searcher = dallekit.search.open(str(work / "index"))
    ours = searcher.index
    dallekit.search.set_search_params(ours, info["search"], 10)
    data.rng = np.random.default_rng(1)  # the same queries whether the data was written in this run or reused
    queries = data.queries(args.queries)
    truth, _ = timed_search(peer, queries, 10, per_query=False)
    found, _ = timed_search(ours, queries, 10, per_query=False)
    raw = recall(found, truth)
    uids = pq.read_table(work / "index" / ROWS_FILE, columns=["uid"]).column("uid").to_numpy(zero_copy_only=False)
    path_found, _ = timed_nearest(searcher, queries, 10)
    dallekit.search.set_search_params(ours, info["search"], 10)  # nearest set it for its RERANK * k candidates
    path = recall(path_found, uids[truth])
    sample = queries[: min(50, len(queries))]  # one at a time: exact search over 1M vectors takes most of a second each
    raw_rates = []

    def ours_round() -> float:
        """The raw index's rate (kept aside), then the search path's (returned): one round of dallekit's side."""
        dallekit.search.set_search_params(ours, info["search"], 10)
        raw_rates.append(1000 / timed_search(ours, sample, 10, per_query=True)[1])
        return 1000 / timed_nearest(searcher, sample, 10)[1]

    rounds = alternate(args.rounds, lambda: 1000 / timed_search(peer, sample, 10, per_query=True)[1], ours_round)
    report(args, info, build_ours, build_peer, rounds, raw_rates, len(queries), raw, path)


def report(args, info: dict, build_ours: str, build_peer: float, rounds: list, raw_rates: list, queries: int, raw: float, path: float) -> None:
    """The benchmark's lines; the last is ratio=<the search path's recall@10>."""
    budget = args.max_memory or str(1000 * args.rows)
    print(f"index: {info['factory']} {json.dumps(info['search'])}, about {info['estimated_bytes'] / 1e6:.0f} MB "
          f"(budget {int(budget) / 1e6 if budget.isdigit() else budget} MB; exact: {4 * DIM * args.rows / 1e6:.0f} MB), "
          f"tuned recall@10 {info['tuning']['recall']}")
    print(f"build: dallekit {build_ours}, exact {build_peer:.1f} s; cores {os.cpu_count()}")
    print("queries a second, one at a time, exact vs the search path (higher is better):")
    speed = print_rounds(rounds, "exact", "search path", "q/s")
    exact_ms, path_ms, raw_ms = (1000 / np.median(r) for r in ([a for a, _ in rounds], [b for _, b in rounds], raw_rates))
    print(f"latency: exact {exact_ms:.2f} ms/query, raw index {raw_ms:.2f} ms/query, search path (rescored) {path_ms:.2f} ms/query "
          f"({speed:.1f}x exact)")
    print(f"recall@10 against exact search over {queries} queries: raw index {raw:.4f}, search path (RERANK candidates rescored) {path:.4f}")
    print(f"ratio={path:.4f}")


if __name__ == "__main__":
    main()
