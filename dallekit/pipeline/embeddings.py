"""The embeddings format: what `dallekit embed` writes and what filter, semantic dedup and search read.

An embeddings folder is a stage folder (`dallekit embed`'s): one shard per input shard, named
like it, with `uid` and the L2-normalised CLIP embeddings of the row's image and caption as
float16 fixed-size lists. Every shard's Parquet schema metadata key `dallekit` holds JSON
`{"format": "dallekit.embeddings/1", "model": <model identity>, "dim": D}`, so that any reader
can tell which CLIP made the vectors without dallekit's stage files. A model identity is what
makes two CLIPs the same: the open_clip name and pretrained tag, or a local checkpoint by
content (its path is recorded, never compared).
"""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.errors import BadInputError
from dallekit.io import list_shards, read_shard
from dallekit.pipeline.shards import fingerprint_content, input_identity, path_digest, read_fingerprint

FORMAT = "dallekit.embeddings/1"
META_KEY = b"dallekit"
IMAGE_COLUMN = "image_embedding"
TEXT_COLUMN = "text_embedding"


def model_identity(clip_model: str, clip_pretrained: str | None, clip_checkpoint: str | None) -> dict:
    """What makes two CLIPs the same: name and pretrained tag, or a local checkpoint's content digest."""
    if clip_checkpoint:
        # the path is absolute so that `search` finds the checkpoint from any working folder; it is never compared
        path = clip_checkpoint if "://" in str(clip_checkpoint) else os.path.abspath(clip_checkpoint)
        return {"model": clip_model, "pretrained": None, "checkpoint": path_digest(clip_checkpoint), "path": str(path)}
    return {"model": clip_model, "pretrained": clip_pretrained or None, "checkpoint": None}


def same_model(a: dict, b: dict) -> bool:
    """Whether two model identities name the same weights (a checkpoint's path is not compared)."""
    if a.get("checkpoint") or b.get("checkpoint"):
        return a.get("checkpoint") == b.get("checkpoint")
    return (a.get("model"), a.get("pretrained")) == (b.get("model"), b.get("pretrained"))


def describe_model(identity: dict) -> str:
    """A model identity as one readable phrase: 'ViT-B-32/laion2b_s34b_b79k' or 'checkpoint runs/clip (sha256 ab12...)'."""
    if identity.get("checkpoint"):
        return f"checkpoint {identity.get('path', '?')} (sha256 {identity['checkpoint']})"
    if identity.get("pretrained"):
        return f"{identity['model']}/{identity['pretrained']}"
    return f"{identity['model']} (random weights)"


def embedding_metadata(identity: dict, dim: int) -> dict[bytes, bytes]:
    """The Parquet schema metadata every embeddings shard carries."""
    return {META_KEY: json.dumps({"format": FORMAT, "model": identity, "dim": int(dim)}).encode()}


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float vectors, L2-normalised in float32, as a fixed_size_list<float16>[D] column."""
    v = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1)
    flat = pa.array(v.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, v.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """A fixed_size_list<float16>[D] column as an (N, D) float16 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)  # flatten honours the array's offset
    return values.reshape(-1, dim)


def shard_metadata(path: str) -> dict:
    """The `dallekit` metadata of one embeddings shard; bad input naming the file when it is not one."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    try:
        found = json.loads(meta[META_KEY])
        if found.get("format") != FORMAT:
            raise ValueError
        return found
    except (KeyError, ValueError, TypeError, AttributeError):
        raise BadInputError(f"{path}: not an embeddings shard (expected `dallekit embed`'s output, format {FORMAT})") from None


def check_table(path: str, table: pa.Table) -> pa.Table:
    """A table read from embeddings shard `path`, checked against the format; bad input naming the file, column and value otherwise.

    Hand-edited or foreign shards must not reach a score or a distance: a null or a NaN there
    would read as "not embedded", and a vector of another width as some other score.
    """
    dim = shard_metadata(path).get("dim")
    for name in (IMAGE_COLUMN, TEXT_COLUMN):
        if name not in table.column_names:
            continue
        column, expected = table.column(name), pa.list_(pa.float16(), dim) if isinstance(dim, int) and dim > 0 else None
        if column.type != expected:
            raise BadInputError(f"{path}: column {name} is {column.type}; expected {expected or 'a positive dim'} (its metadata's dim)")
        # a row's float32 sum is NaN or infinite when one of its values is (float16's finite values cannot overflow it): n floats, not n x D
        bad = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None
        if bad is None:
            bad = ~np.isfinite(embedding_matrix(column).sum(axis=1, dtype=np.float32))
        if bad.any():
            raise BadInputError(f"{path}: column {name} holds a null, NaN or infinite vector (row {int(bad.argmax())}{_uid_at(table, int(bad.argmax()))}); "
                                "expected `dallekit embed`'s unit vectors")
    uids = table.column("uid") if "uid" in table.column_names else pa.chunked_array([], pa.string())
    if uids.null_count:
        raise BadInputError(f"{path}: column uid holds a null (row {int(uids.is_null().to_numpy(zero_copy_only=False).argmax())}); expected each row's uid once")
    if pc.count_distinct(uids).as_py() != len(uids):
        counts = pc.value_counts(uids)
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        raise BadInputError(f"{path}: column uid holds {repeated} more than once; expected each row's uid once")
    return table


def _uid_at(table: pa.Table, row: int) -> str:
    """', uid X' for a row of a table with a uid column (a message's detail), else ''."""
    return f", uid {table.column('uid')[row].as_py()}" if "uid" in table.column_names else ""


def folder_metadata(folder: str) -> dict:
    """The embeddings folder's model identity and dimension, from its first shard (all shards agree: embed writes them in one run)."""
    return shard_metadata(list_shards(folder)[0])


def check_model(folder: str, identity: dict, option: str) -> dict:
    """The folder's metadata; bad input naming both models when its vectors come from another CLIP than `identity`."""
    found = folder_metadata(folder)
    if not same_model(found["model"], identity):
        raise BadInputError(f"{option} {folder}: embeddings from {describe_model(found['model'])}, "
                            f"but this run's CLIP is {describe_model(identity)}; embed again with this CLIP or pass its options")
    return found


def read_embeddings(path: str, text: bool = False) -> tuple[list[str], np.ndarray]:
    """(uids, (N, D) float16 image embeddings, or text embeddings with `text`) of one embeddings shard."""
    column = TEXT_COLUMN if text else IMAGE_COLUMN
    table = check_table(path, read_shard(path, ["uid", column]))
    return table.column("uid").to_pylist(), embedding_matrix(table.column(column))


def check_embedded_input(folder: str, input_dir: str, identity: dict, option: str = "--embeddings") -> dict:
    """The embeddings folder's identity; bad input when it is not a finished `dallekit embed` of `input_dir` as it is now."""
    embedded = input_identity(folder, ("embed",))
    recorded = (read_fingerprint(folder) or {}).get("input")
    if not isinstance(recorded, dict) or fingerprint_content(recorded) != fingerprint_content(identity):
        source = recorded.get("path", "?") if isinstance(recorded, dict) else "an unrecorded input"
        raise BadInputError(f"{option} {folder}: embeddings of {source} as it was then, not of {input_dir} as it is now; "
                            f"run `dallekit embed {input_dir} --out DIR` and pass that folder")
    return embedded



def clip_score(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N,) CLIP scores of (N, D) unit image and caption vectors: image . text, summed in float32 (the filter's score from embeddings)."""
    return (np.asarray(image, np.float32) * np.asarray(text, np.float32)).sum(axis=1)
