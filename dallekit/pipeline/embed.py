"""embed: image shards -> each row's CLIP image and caption embeddings, so CLIP runs once per row in a pipeline.

One output shard per input shard, named like it, in the embeddings format of
`pipeline/embeddings.py`: `uid`, `image_embedding` and `text_embedding` (L2-normalised float16),
and the model identity in every shard's schema metadata (an empty shard's too). Filter
(`--embeddings`), semantic dedup and the search index read it. A task reads its shard a batch
at a time, decodes the batch's JPEGs at a reduced draft size (CLIP's input side, twice over)
and runs the batch through CLIP, loaded once per worker process. Rows it cannot embed are
rejects, the first that applies: `no_image` (no bytes: a failed download), `image_too_large`
(over 64 Mpx by its header, never decoded), `undecodable`.

Torch threads: Dask's nanny starts each worker process with OMP_NUM_THREADS=1 (its
`distributed.nanny.pre-spawn-environ`), so torch runs one thread per worker process and the
default of one worker per core uses the cores once; nothing here changes that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from dallekit.config import EmbedConfig, output_options
from dallekit.errors import BadInputError
from dallekit.images import UndecodableImage, decode_rgb
from dallekit.io import open_shard
from dallekit.pipeline.embeddings import IMAGE_COLUMN, TEXT_COLUMN, embedding_array, embedding_metadata, model_identity
from dallekit.pipeline.filter import header_reason, scorer_input_size
from dallekit.pipeline.shards import ShardResult
from dallekit.pipeline.stage import Plan, Stage, run_plan, shard_tasks

RULES = ("no_image", "image_too_large", "undecodable")  # funnel order: the first that applies is a reject's reason
CLIP_OPTIONS = ("clip_model", "clip_pretrained", "clip_checkpoint")


@dataclass
class EmbedShard:
    """One embed task: the input shard, the options, and the schema metadata every output shard carries."""

    path: str
    config: EmbedConfig
    metadata: dict[bytes, bytes]
    dim: int


def load_scorer(config: EmbedConfig):
    """The CLIP of these options, loaded once per process."""
    from dallekit.models.clip import cached_clip

    return cached_clip(config.clip_model, config.clip_pretrained, config.clip_checkpoint, config.device)


def output_schema(dim: int, metadata: dict[bytes, bytes]) -> pa.Schema:
    """The embeddings shard's schema: uid and the two fixed-size float16 vectors, with the model in its metadata."""
    vector = pa.list_(pa.float16(), dim)
    return pa.schema([("uid", pa.string()), (IMAGE_COLUMN, vector), (TEXT_COLUMN, vector)], metadata=metadata)


def skip_reason(data: bytes | None) -> str | None:
    """Why a row is not embedded, by its bytes and header alone (nothing decoded): no_image, image_too_large, undecodable."""
    if not data:
        return "no_image"
    return header_reason(data)


def embed_batch(scorer, images: list, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) image and (B, D) caption embeddings, float32 (the format's column rounds them to float16)."""
    return scorer.embed_images(images).cpu().numpy(), scorer.embed_texts(captions).cpu().numpy()


def _embedded_batches(task: EmbedShard, result: ShardResult) -> Iterator[pa.Table]:
    """The shard's embeddings a batch at a time (one table at least, for the schema); fills in the result's rejects."""
    scorer = load_scorer(task.config)
    schema, draft = output_schema(task.dim, task.metadata), scorer_input_size(scorer)
    rejected: dict[str, list] = {"uid": [], "caption": [], "reason": [], "error_message": []}
    wrote = False
    for batch in open_shard(task.path).iter_batches(batch_size=task.config.batch_size, columns=["uid", "caption", "jpg"]):
        uids, captions, images = (batch.column(name).to_pylist() for name in ("uid", "caption", "jpg"))
        pictures, good = [], []
        for i, data in enumerate(images):
            reason, message = skip_reason(data), None
            if reason is None:
                try:
                    pictures.append(decode_rgb(data, draft_size=draft))
                    good.append(i)
                    continue
                except UndecodableImage as err:  # a truncated body behind a good header
                    reason, message = "undecodable", str(err)[:200]
            for name, value in (("uid", uids[i]), ("caption", captions[i]), ("reason", reason), ("error_message", message)):
                rejected[name].append(value)
        if good:
            image_vectors, text_vectors = embed_batch(scorer, pictures, [captions[i] or "" for i in good])
            yield pa.Table.from_arrays([pa.array([uids[i] for i in good], pa.string()), embedding_array(image_vectors),
                                        embedding_array(text_vectors)], schema=schema)
            wrote = True
    if not wrote:
        yield schema.empty_table()
    result.rejects = pa.table(rejected, schema=pa.schema([(name, pa.string()) for name in rejected]))


def embed_shard(task: EmbedShard) -> ShardResult:
    """Embed one shard's images and captions; rows without a decodable image are rejected with their reason."""
    result = ShardResult(rows_in=open_shard(task.path).metadata.num_rows, kept=[])
    result.kept = _embedded_batches(task, result)
    return result


STAGE = Stage("embed", ("download", "adopt", "clean", "filter"), frozenset({"uid", "caption", "jpg"}),
              "image shards from `dallekit clean`, `filter`, `download` or `adopt`", embed_shard, rules=RULES)


def plan_embed(input_dir: str, config: EmbedConfig) -> Plan:
    """The shards to embed and the model's identity; checks the input and that CLIP loads, before any task runs."""
    identity, paths, rows = STAGE.input_of(input_dir)
    if sum(rows) == 0:
        raise BadInputError(f"{input_dir}: a `{identity['stage']}` stage with no rows; nothing to embed")
    scorer = load_scorer(config)  # fail fast, here: a bad name, tag or checkpoint is one line before a cluster starts
    dim = _embedding_dim(scorer)
    model = model_identity(config.clip_model, config.clip_pretrained, config.clip_checkpoint)  # a checkpoint by content
    metadata = embedding_metadata(model, dim)
    options = {k: v for k, v in output_options(config).items() if k not in CLIP_OPTIONS}  # the CLIP is `model`, by content
    return Plan(inputs=[input_dir], fingerprint={"input": identity, "model": model, "dim": dim, "options": options},
                stats_config=asdict(config) | {"input": input_dir, "model": model, "dim": dim},
                tasks=lambda _, __: shard_tasks(paths, lambda p: EmbedShard(p, config, metadata, dim)))


def _embedding_dim(scorer) -> int:
    """The model's embedding width, from one caption (open_clip models do not all name it the same way)."""
    return int(scorer.embed_texts(["a"]).shape[1])


def embed(input_dir: str, output_dir: str, config: EmbedConfig, client, plan: Plan | None = None) -> dict:
    """Run the embed stage; prints and saves its funnel (`_funnel.json`, `_funnel.png`)."""
    return run_plan(STAGE, plan or plan_embed(input_dir, config), output_dir, client, config.overwrite)
