"""encode: filtered image shards -> token Parquet (dVAE image codes + BPE caption ids).

Each task decodes its shard's images, resizes the shorter side and centre-crops to the dVAE's
size, encodes them in batches (argmax codes), tokenizes captions and writes the token format
of `dallekit/tokenize/tokens.py`. The dVAE and tokenizer load once per worker. An image whose
header gives it more than 64 Mpx is rejected with reason `image_too_large`, before any decode;
one that does not decode, with reason `undecodable`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from dallekit.config import EncodeConfig, output_options
from dallekit.errors import BadInputError
from dallekit.images import UndecodableImage, load_square, undecodable_reason
from dallekit.io import read_shard, shard_schema
from dallekit.pipeline.shards import ShardResult
from dallekit.pipeline.stage import Plan, Stage, run_plan, shard_tasks
from dallekit.tokenize.image import cached_image_tokenizer
from dallekit.tokenize.text import load_text_tokenizer
from dallekit.tokenize.tokens import token_metadata, token_table


@dataclass
class EncodeShard:
    """One encode task."""

    path: str
    dvae: str
    config: EncodeConfig
    metadata: dict


def encode_shard(task: EncodeShard) -> ShardResult:
    """Decode, encode and tokenize one shard."""
    image_tokenizer = cached_image_tokenizer(task.dvae, task.config.device)
    text_tokenizer = load_text_tokenizer(task.config.text_tokenizer)
    names = shard_schema(task.path)[0].names
    keep = [c for c in task.config.keep_columns if c in names]
    table = read_shard(task.path, columns=["uid", "caption", "jpg", *keep])
    size = image_tokenizer.config.image_size
    pixels, good, errors = [], [], []
    for i, data in enumerate(table.column("jpg").to_pylist()):
        try:
            pixels.append(load_square(data, size))
            good.append(i)
        except UndecodableImage as err:  # load_square reads the header before it decodes
            errors.append((i, undecodable_reason(err), str(err)))
    codes = np.zeros((0, image_tokenizer.config.grid ** 2), np.uint16)
    mirrored = codes if task.config.hflip else None
    if pixels:
        batch = task.config.batch_size
        codes = np.concatenate([image_tokenizer.encode(np.stack(pixels[s : s + batch])) for s in range(0, len(pixels), batch)])
        if task.config.hflip:  # codes cannot be mirrored (a code is a patch): the mirrored image is encoded too
            mirrored = np.concatenate([image_tokenizer.encode(np.ascontiguousarray(np.stack(pixels[s : s + batch])[:, :, ::-1]))
                                       for s in range(0, len(pixels), batch)])
    kept_rows = table.take(pa.array(good, pa.int64()))
    captions = kept_rows.column("caption").to_pylist()
    kept = token_table(
        kept_rows.column("uid"), captions, [text_tokenizer.encode(c or "") for c in captions], codes, task.metadata,
        extra={c: kept_rows.column(c) for c in keep}, image_tokens_hflip=mirrored,
    )
    bad = table.take(pa.array([i for i, _, _ in errors], pa.int64())).drop_columns(["jpg"])
    rejects = bad.append_column("reason", pa.array([r for _, r, _ in errors], pa.string())).append_column(
        "error_message", pa.array([e for _, _, e in errors], pa.string())
    )
    return ShardResult(rows_in=table.num_rows, kept=kept, rejects=rejects)


STAGE = Stage("encode", ("filter", "clean"), frozenset({"uid", "caption", "jpg"}), "image shards from `dallekit filter`", encode_shard,
              parquet_kwargs={"compression": "zstd"})


def plan_encode(input_dir: str, dvae: str, config: EncodeConfig) -> Plan:
    """The shards to encode and the token metadata; checks the input and loads both tokenizers first."""
    identity, paths, _ = STAGE.input_of(input_dir)
    image_tokenizer = cached_image_tokenizer(dvae, config.device)
    text_tokenizer = load_text_tokenizer(config.text_tokenizer)
    for name, vocab in (("image codebook", image_tokenizer.config.codebook_size), ("text vocabulary", text_tokenizer.vocab_size)):
        if vocab > 2**16:
            raise BadInputError(f"{name} of {vocab} ids does not fit the uint16 token columns")
    metadata = token_metadata(image_tokenizer.metadata(), text_tokenizer.metadata())
    return Plan(
        inputs=[input_dir, dvae], fingerprint={"input": identity, "tokens": metadata,
                                              # the tokenizer by content: its folder's path is where it is, not what it is
                                              "options": output_options(config) | {"text_tokenizer": text_tokenizer.metadata()}},
        stats_config=asdict(config) | {"input": input_dir, "dvae": dvae, "tokens": metadata},
        tasks=lambda _, __: shard_tasks(paths, lambda p: EncodeShard(p, dvae, config, metadata)),
    )


def encode(input_dir: str, dvae: str, output_dir: str, config: EncodeConfig, client, plan: Plan | None = None) -> dict:
    """Run the encode stage; token shards are zstd-compressed."""
    return run_plan(STAGE, plan or plan_encode(input_dir, dvae, config), output_dir, client, config.overwrite)
