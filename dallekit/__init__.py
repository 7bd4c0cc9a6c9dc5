"""dallekit: text-image datasets on Dask, dVAE tokens, and a compact DALL-E."""

from dallekit.pipeline.shards import load_stage

__all__ = ["load_stage"]
