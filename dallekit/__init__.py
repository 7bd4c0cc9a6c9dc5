"""dallekit: text-image datasets on Dask, dVAE tokens, and a compact DALL-E."""
