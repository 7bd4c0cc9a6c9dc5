"""Token Parquet: the trainer's input, readable by any pandas or pyarrow user.

Columns: `uid` string, `caption` string, `text_tokens` list<uint16> (BPE ids, no BOS/EOS or
padding), `image_tokens` fixed_size_list<uint16>[grid*grid] (dVAE codes, row-major), plus
optional pass-through columns. The schema metadata key `dallekit` holds JSON describing both
tokenizers; shards that disagree on it cannot be mixed.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dallekit.config import BadInputError

FORMAT = "dallekit.tokens/1"
METADATA_KEY = b"dallekit"


def token_metadata(image_tokenizer: dict, text_tokenizer: dict) -> dict:
    """The JSON stored under the `dallekit` schema metadata key."""
    return {"format": FORMAT, "image_tokenizer": image_tokenizer, "text_tokenizer": text_tokenizer}


def token_table(uids, captions, text_tokens: list[list[int]], image_tokens: np.ndarray, metadata: dict, extra: dict | None = None) -> pa.Table:
    """Build a token table with the documented types and metadata."""
    n_codes = metadata["image_tokenizer"]["grid"] ** 2
    flat_text = np.concatenate([np.asarray(t, dtype=np.uint16) for t in text_tokens]) if text_tokens else np.zeros(0, np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in text_tokens])]).astype(np.int32)
    columns = {
        "uid": pa.array(uids, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "text_tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_text, pa.uint16())),
        "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(image_tokens, np.uint16).reshape(-1), pa.uint16()), n_codes),
        **(extra or {}),
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def read_token_metadata(path: str) -> dict:
    """The `dallekit` metadata of one token file; bad input if it has none."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise BadInputError(f"{path}: no `dallekit` token metadata (expected a shard written by `dallekit encode`)")
    metadata = json.loads(raw)
    if metadata.get("format") != FORMAT:
        raise BadInputError(f"{path}: token format {metadata.get('format')!r}, expected {FORMAT!r}")
    return metadata


def check_token_files(paths: list[str], expected: dict | None = None) -> dict:
    """The metadata shared by all token files; bad input naming the files and key that disagree."""
    if not paths:
        raise BadInputError("no token shards given")
    reference = expected if expected is not None else read_token_metadata(paths[0])
    where = "the model" if expected is not None else paths[0]
    for path in paths:
        metadata = read_token_metadata(path)
        for section in ("image_tokenizer", "text_tokenizer"):
            if metadata[section] != reference[section]:
                diff = sorted(k for k in set(metadata[section]) | set(reference[section]) if metadata[section].get(k) != reference[section].get(k))
                raise BadInputError(
                    f"{path}: {section} {', '.join(f'{k}={metadata[section].get(k)!r}' for k in diff)} "
                    f"disagrees with {where} ({', '.join(f'{k}={reference[section].get(k)!r}' for k in diff)})"
                )
    return reference
