"""Search by text or image over an embeddings folder: `build_index` (`dallekit index`) and `open` (`dallekit search`).

    import dallekit.search
    dallekit.search.build_index("runs/embed", "runs/index", max_memory="4GB")
    index = dallekit.search.open("runs/index")
    hits = index.text("a red apple", k=16)      # DataFrame: uid, score, caption, jpg, the stage's other columns
    hits = index.image("apple.jpg", k=16)       # a path, bytes or a PIL image

The index (`index.faiss`, `index.json`, `rows.parquet`) is described in build.py; which kind the
budget buys in choice.py; how a query finds its rows in query.py.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from dallekit.errors import BadInputError
from dallekit.io import SHARD_NAME
from dallekit.pipeline.embeddings import IMAGE_COLUMN, embedding_matrix
from dallekit.search.build import INDEX_FILE, build_index, set_search_params
from dallekit.search.choice import choose_index, parse_memory
from dallekit.search.query import (
    REBUILD,
    OpenShards,
    check_current,
    clip_identity,
    hits_frame,
    query_image,
    read_info,
    stage_of,
    stored_rows,
    write_grid,
)

RERANK = 2  # candidates an approximate index returns per hit asked for, rescored exactly from the stored vectors

__all__ = ["SearchIndex", "build_index", "choose_index", "open", "open_index", "parse_memory", "write_grid"]


class SearchIndex:
    """A finished index, checked against its embeddings folder: search it by text, image or vector; hits as DataFrames."""

    def __init__(self, index_dir: str, clip_model: str | None = None, clip_pretrained: str | None = None,
                 clip_checkpoint: str | None = None, device: str = "auto"):
        import faiss

        self.path = index_dir
        self.info = read_info(index_dir)
        self.embeddings = check_current(index_dir, self.info)
        self.stage = stage_of(self.embeddings)
        self.clip_model = clip_identity(self.info, self.embeddings, clip_model, clip_pretrained, clip_checkpoint)
        self.device = device
        try:
            self.index = faiss.read_index(os.path.join(index_dir, INDEX_FILE))
        except RuntimeError as err:
            raise BadInputError(f"{index_dir}/{INDEX_FILE}: not a readable faiss index ({str(err).splitlines()[0][:160]}); "
                                "rebuild with `dallekit index`") from None
        if (self.index.ntotal, self.index.d) != (self.info["rows"], self.info["dim"]):
            raise BadInputError(f"{index_dir}/{INDEX_FILE}: holds {self.index.ntotal} vectors of {self.index.d} dimensions, "
                                f"index.json {self.info['rows']} of {self.info['dim']}; rebuild with `dallekit index`")
        self.shard_names, self.starts = shard_starts(index_dir, self.info)
        self.shards = OpenShards(self.embeddings)  # a query reads a few rows of a few shards: their footers are parsed once

    def clip(self):
        """The CLIP that made the embeddings, loaded once per process."""
        from dallekit.models.clip import cached_clip

        m = self.clip_model
        return cached_clip(m["model"], m.get("pretrained"), m.get("path") if m.get("checkpoint") else None, self.device)

    def text(self, query: str, k: int = 16) -> pd.DataFrame:
        """The k images nearest to a caption."""
        if not isinstance(query, str) or not query.strip():
            raise BadInputError("search: the text query is empty; give words to search for, or --image FILE")
        return self.vector(self.clip().embed_texts([query]).cpu().numpy()[0], k)

    def image(self, image: Any, k: int = 16) -> pd.DataFrame:
        """The k images nearest to an image: a file path, its bytes or a PIL image."""
        return self.vector(self.clip().embed_images([query_image(image)]).cpu().numpy()[0], k)

    def nearest(self, vector: np.ndarray, k: int = 16) -> pd.DataFrame:
        """The k nearest rows to a unit vector: id, uid, cosine score and where its vector is (embeddings shard, row).

        An approximate index (HNSW, IVF-PQ) is asked for RERANK times k candidates, whose stored
        vectors are read from the embeddings shards that hold them: each score is then the exact
        cosine, and the best k of them are kept, so the order is exact among the candidates.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise BadInputError(f"-k {k}: expected a whole number of hits, at least 1")
        query = np.asarray(vector, np.float32).reshape(1, -1)
        if query.shape[1] != self.info["dim"]:
            raise BadInputError(f"a query vector of {query.shape[1]} dimensions; the index holds {self.info['dim']}")
        exact = self.info["kind"] == "flat"
        wanted = int(min(k if exact else RERANK * k, self.info["rows"]))
        set_search_params(self.index, self.info.get("search") or {}, wanted)
        scores, ids = self.index.search(query, wanted)
        keep = ids[0] >= 0  # an approximate index may find fewer than asked
        ids, scores = ids[0][keep], scores[0][keep]
        where = np.searchsorted(self.starts, ids, side="right") - 1  # index ids are embeddings rows in folder order
        names, rows = self.shard_names[where], ids - self.starts[where]
        stored = stored_rows(self.shards, names, rows, ["uid"] if exact else ["uid", IMAGE_COLUMN])
        found = pd.DataFrame({"id": ids, "uid": stored.column("uid").to_pylist(), "score": scores, "shard": names.tolist(), "row": rows})
        if not exact and len(found):
            found["score"] = embedding_matrix(stored.column(IMAGE_COLUMN)).astype(np.float32) @ query[0]
            found = found.sort_values("score", ascending=False, kind="stable")
        return found.head(int(k)).reset_index(drop=True)

    def vector(self, vector: np.ndarray, k: int = 16) -> pd.DataFrame:
        """The k images nearest to a unit vector of the index's CLIP, joined to their stage rows."""
        hits = self.nearest(vector, k)
        if hits.empty:
            return pd.DataFrame(columns=["uid", "score"])
        return hits_frame(self.stage, hits)


def shard_starts(index_dir: str, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """index.json's embeddings shards (stems) and the index id of each one's first row; bad input when they do not add up to its rows."""
    try:
        names = np.array([str(name) for name, _ in info["shards"]], dtype=object)
        starts = np.concatenate([[0], np.cumsum([int(n) for _, n in info["shards"]])]).astype(np.int64)
    except (KeyError, TypeError, ValueError):
        names, starts = np.array([], dtype=object), np.zeros(1, np.int64)
    if starts[-1] != info["rows"]:
        raise BadInputError(f"{index_dir}/index.json: its shards hold {starts[-1]} rows, not the {info['rows']} it records; {REBUILD}")
    stray = next((name for name in names if not SHARD_NAME.fullmatch(f"{name}.parquet")), None)
    if stray is not None:  # a shard's path is built from this value: a plain shard name only, never a path
        raise BadInputError(f"{index_dir}/index.json: shards name {stray!r}; expected shard names such as part-00000; {REBUILD}")
    return names, starts[:-1]


def open_index(index_dir: str, clip_model: str | None = None, clip_pretrained: str | None = None, clip_checkpoint: str | None = None,
               device: str = "auto") -> SearchIndex:
    """A finished index to search; the clip options, when given, must name the model of its embeddings."""
    return SearchIndex(index_dir, clip_model, clip_pretrained, clip_checkpoint, device)


open = open_index  # dallekit.search.open(INDEX), as the README shows; the builtin is not used in this package
