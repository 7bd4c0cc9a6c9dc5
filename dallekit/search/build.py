"""`dallekit index`: a faiss index over an embeddings folder's image vectors, built shard by shard.

Inner product on unit vectors is cosine similarity. The index kind follows the memory budget
(`choice.choose_index`); an index that trains (IVF-PQ) learns from a bounded random sample, read
in one pass over the shards, and every vector is then added shard by shard, so the build holds
the index, the sample and one shard, never the whole folder. During the adding pass the exact
top 10 of a few hundred of the folder's own caption vectors is kept (one matrix product per
shard), and the search parameter (IVF's nprobe, HNSW's efSearch) is then the smallest that
finds TUNE_RECALL of those neighbours. The folder is written by one run (its lease), each file
atomically, the old `index.json` removed first and the new one written last: a folder with an
`index.json` holds a finished index, and the json records each file's size and checksum.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dallekit.errors import BadInputError
from dallekit.io import (
    atomic_file,
    file_checksum,
    list_shards,
    read_shard,
    shard_schema,
    shard_stem,
    write_json_atomic,
    write_tables_atomic,
)
from dallekit.pipeline.embeddings import IMAGE_COLUMN, TEXT_COLUMN, check_table, embedding_matrix, shard_metadata
from dallekit.pipeline.passes import check_held, hold_folder
from dallekit.pipeline.shards import fingerprint_content, input_identity, prepare_output
from dallekit.progress import progress
from dallekit.search.choice import IndexChoice, choose_index, memory_text, parse_memory, train_rows

FORMAT = "dallekit.search-index/1"
INDEX_FILE, INFO_FILE, ROWS_FILE = "index.faiss", "index.json", "rows.parquet"
EMBED_STAGES = ("embed",)
TUNE_QUERIES = 256  # caption vectors of the folder's own rows whose exact neighbours tune the search parameter
TUNE_K = 10
TUNE_RECALL = 0.97  # the share of those neighbours the chosen parameter must find (the benchmark asks 0.95 of other queries)
SEED = 0


@dataclass
class Folder:
    """An embeddings folder, checked: its identity, shards with their row counts, model and dimension."""

    path: str
    identity: dict
    shards: list[str]
    rows: list[int]
    model: dict
    dim: int


def read_folder(embed_dir: str) -> Folder:
    """The embeddings folder's identity, shards and model; bad input when it is not a finished embeddings folder or holds no rows."""
    identity = input_identity(embed_dir, EMBED_STAGES)
    shards = list_shards(embed_dir)
    metas = [shard_metadata(p) for p in shards]
    first = metas[0]
    for path, meta in zip(shards, metas):
        if meta.get("model") != first.get("model") or meta.get("dim") != first.get("dim"):
            raise BadInputError(f"{path}: its model or dimension differs from {shards[0]}'s; embed the folder again in one run")
    rows = []
    for path in shards:
        schema, count = shard_schema(path)
        if IMAGE_COLUMN not in schema.names:
            raise BadInputError(f"{path}: no {IMAGE_COLUMN} column; expected `dallekit embed`'s output")
        rows.append(count)
    if not sum(rows):
        raise BadInputError(f"{embed_dir}: an embeddings folder with no rows; nothing to index")
    return Folder(embed_dir, identity, shards, rows, first["model"], int(first["dim"]))


def build_index(embed_dir: str, out: str, max_memory: str | int = "4GB", kind: str = "auto", overwrite: bool = False) -> dict:
    """Build the search index of an embeddings folder into `out`; returns what index.json records.

    A finished index of the same embeddings (by identity) and options is answered from its
    index.json; one of other embeddings or options is refused unless `overwrite`.
    """
    budget = parse_memory(max_memory)
    folder = read_folder(embed_dir)
    prepare_output(out, [embed_dir])
    choice = choose_index(sum(folder.rows), folder.dim, budget, kind)
    with hold_folder(out, "index"):
        info_path = os.path.join(out, INFO_FILE)
        finished = _finished_index(out, folder, {"max_memory": budget, "requested_kind": kind}, overwrite)
        if finished is not None:
            return finished
        if os.path.exists(info_path):
            os.remove(info_path)  # from here until the new one is written, the folder holds no finished index
        start = time.perf_counter()
        info = _build(folder, out, choice)
        info |= {"max_memory": budget, "requested_kind": kind, "seconds": round(time.perf_counter() - start, 3)}
        check_held(out)  # another run took the folder over while this one slept: its files are not ours to vouch for
        write_json_atomic(info, info_path)
    return info


def _finished_index(out: str, folder: Folder, options: dict, overwrite: bool) -> dict | None:
    """The index.json of a whole index in `out` built from this folder as it is now with these options; None when there is none to keep.

    An index of other embeddings or options is bad input unless `overwrite`: a rebuild replaces
    it, and a rerun with other options is refused rather than silently replacing it.
    """
    path = os.path.join(out, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None  # none, or damaged: built afresh
    if not isinstance(info, dict):
        return None
    built_from = info.get("embeddings") if isinstance(info.get("embeddings"), dict) else {}
    same_folder = built_from.get("path") == os.path.realpath(folder.path)
    same_options = {k: info.get(k) for k in options} == options
    if not (same_folder and same_options):
        if overwrite:
            return None
        differs = f"the embeddings {built_from.get('path')}" if not same_folder else f"other options ({', '.join(f'{k} {info.get(k)}' for k in options)})"
        raise BadInputError(f"--out {out}: holds an index of {differs}; give another folder, or pass --overwrite to rebuild it")
    if fingerprint_content(built_from.get("identity")) != fingerprint_content(folder.identity):
        print(f"index: {folder.path} changed since {out} was built from it: building it again")
        return None
    if not _files_whole(out, info):
        return None  # the same index with a damaged file: built again
    print(f"index: {out} already holds this index ({info.get('factory')} over {info.get('rows')} vectors)")
    return info


def _files_whole(out: str, info: dict) -> bool:
    """Whether the files index.json records are there with their recorded sizes and checksums."""
    files = info.get("files")
    if not isinstance(files, dict) or set(files) != {INDEX_FILE, ROWS_FILE}:
        return False
    for name, recorded in files.items():
        target = os.path.join(out, name)
        if not isinstance(recorded, dict) or not os.path.isfile(target) or os.path.getsize(target) != recorded.get("bytes"):
            return False
        if file_checksum(target) != recorded.get("checksum"):
            return False
    return True


def _build(folder: Folder, out: str, choice: IndexChoice) -> dict:
    """Sample, train, add shard by shard with the exact neighbours of the tuning queries, tune, write the files; index.json's content."""
    import faiss

    total = sum(folder.rows)
    rng = np.random.default_rng(SEED)
    train_at = np.sort(rng.choice(total, train_rows(choice, total), replace=False))
    tune_at = np.sort(rng.choice(total, min(TUNE_QUERIES, total), replace=False))
    train, queries = _sample(folder, train_at, tune_at)
    index = faiss.index_factory(folder.dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    _construction_params(index, choice)
    if choice.needs_training:
        print(f"index: training {choice.factory} on {len(train)} vectors")
        index.train(train)
    del train
    truth = TopK(len(queries), min(TUNE_K, total))
    write_tables_atomic(_add_shards(index, folder, queries, truth), os.path.join(out, ROWS_FILE))
    search, recall = tune(index, choice, queries, truth.ids)
    with atomic_file(os.path.join(out, INDEX_FILE)) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    files = {name: {"bytes": os.path.getsize(os.path.join(out, name)), "checksum": file_checksum(os.path.join(out, name))}
             for name in (INDEX_FILE, ROWS_FILE)}
    print(f"index: {choice.factory} over {total} vectors, about {memory_text(choice.estimated_bytes)} in memory, "
          f"recall@{truth.k} {recall:.3f} on {len(queries)} of its captions with {search or 'exact search'}")
    return {"format": FORMAT, "kind": choice.kind, "factory": choice.factory, "params": choice.params, "search": search,
            "estimated_bytes": choice.estimated_bytes, "rows": total, "dim": folder.dim, "model": folder.model,
            "embeddings": {"path": os.path.realpath(folder.path), "identity": folder.identity},
            "shards": [[shard_stem(p), n] for p, n in zip(folder.shards, folder.rows)], "files": files,
            "tuning": {"queries": len(queries), "k": truth.k, "recall": round(recall, 4), "target": TUNE_RECALL}}


def _construction_params(index, choice: IndexChoice) -> None:
    """HNSW's efConstruction; IVF-PQ's k-means iterations and sample sizes (faiss's defaults train PQ codes for minutes)."""
    import faiss

    if choice.kind == "hnsw":
        index.hnsw.efConstruction = choice.params["efConstruction"]
    if choice.kind == "ivfpq":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = 10
        ivf.pq.cp.niter = 10
        ivf.pq.cp.max_points_per_centroid = 64  # each sub-quantizer's k-means on 64 points a centroid, not 256
        ivf.do_polysemous_training = False  # the factory's default: minutes of annealing, for a Hamming filter search never uses


def _positions(folder: Folder, wanted: np.ndarray) -> list[np.ndarray]:
    """Global row numbers (sorted) as the rows of each shard."""
    bounds = np.concatenate([[0], np.cumsum(folder.rows)])
    return [wanted[(wanted >= lo) & (wanted < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def _sample(folder: Folder, train_at: np.ndarray, tune_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training image vectors, tuning caption vectors) as float32, read in one pass over the shards that hold any of them."""
    train, queries = [], []
    for path, t_rows, q_rows in progress(list(zip(folder.shards, _positions(folder, train_at), _positions(folder, tune_at))),
                                         desc="index: sample", unit="shard"):
        if not len(t_rows) and not len(q_rows):
            continue
        table = check_table(path, read_shard(path, [IMAGE_COLUMN, TEXT_COLUMN]))
        train.append(embedding_matrix(table.column(IMAGE_COLUMN).take(pa.array(t_rows, pa.int64()))))
        queries.append(embedding_matrix(table.column(TEXT_COLUMN).take(pa.array(q_rows, pa.int64()))))
    dim = folder.dim
    as_float = [np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dim), np.float32) for parts in (train, queries)]
    return as_float[0], as_float[1]


class TopK:
    """The running exact top k (ids and scores) of a few queries, merged shard by shard."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.scores = np.full((queries, k), -np.inf, np.float32)
        self.ids = np.full((queries, k), -1, np.int64)

    def add(self, query: np.ndarray, vectors: np.ndarray, first_id: int) -> None:
        """Merge in the scores of `vectors`, whose ids start at `first_id`."""
        if not len(query):
            return
        scores = query @ vectors.T  # (queries, rows)
        ids = np.broadcast_to(np.arange(first_id, first_id + len(vectors)), scores.shape)
        all_scores, all_ids = np.concatenate([self.scores, scores], 1), np.concatenate([self.ids, ids], 1)
        part = np.argpartition(-all_scores, self.k - 1, axis=1)[:, : self.k]  # the k best unordered: a full sort cost 8x the matmul
        best = np.take_along_axis(part, np.argsort(-np.take_along_axis(all_scores, part, 1), axis=1, kind="stable"), 1)
        self.scores, self.ids = np.take_along_axis(all_scores, best, 1), np.take_along_axis(all_ids, best, 1)


def _add_shards(index, folder: Folder, queries: np.ndarray, truth: TopK):
    """Add each shard's image vectors to the index (ids in folder order) and yield its rows of the row map."""
    first = 0
    for path in progress(folder.shards, desc="index: add", unit="shard"):
        table = check_table(path, read_shard(path, ["uid", IMAGE_COLUMN]))
        vectors = embedding_matrix(table.column(IMAGE_COLUMN)).astype(np.float32)
        index.add(vectors)
        truth.add(queries, vectors, first)
        first += len(vectors)
        name = shard_stem(path)
        yield pa.table({"uid": table.column("uid"), "shard": pa.array([name] * len(vectors), pa.string()).dictionary_encode(),
                        "row": pa.array(np.arange(len(vectors)), pa.int64())})


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of each query's true neighbours that `found` holds, averaged over queries."""
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(found, truth)])) if len(truth) else 1.0


def tune(index, choice: IndexChoice, queries: np.ndarray, truth: np.ndarray) -> tuple[dict, float]:
    """The smallest search parameter (nprobe or efSearch) whose recall on the queries reaches TUNE_RECALL, else the best; with that recall."""
    if choice.kind == "flat" or not len(queries):
        return {}, 1.0
    name = "nprobe" if choice.kind == "ivfpq" else "efSearch"
    top = choice.params["nlist"] if choice.kind == "ivfpq" else 2048
    values = [v for v in (2 ** i for i in range(0, 12)) if v <= top and (name == "nprobe" or v >= 16)]
    best = (values[-1], -1.0)
    for value in values:
        set_search_params(index, {name: value})
        found = recall(index.search(queries, truth.shape[1])[1], truth)
        if found >= TUNE_RECALL:
            return {name: value}, found
        best = max(best, (value, found), key=lambda pair: pair[1])
    set_search_params(index, {name: best[0]})
    return {name: best[0]}, best[1]


def set_search_params(index, params: dict, k: int = 0) -> None:
    """Apply index.json's search parameters (efSearch at least k: HNSW returns no more than it explores)."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, max(int(value), k) if name == "efSearch" else int(value))
