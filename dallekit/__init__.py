"""dallekit: text-image datasets on Dask, dVAE tokens, and a compact DALL-E."""

from dallekit.io import load_stage

__all__ = ["load_stage"]
