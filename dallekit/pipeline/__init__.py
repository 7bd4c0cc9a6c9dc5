"""Dask pipeline stages."""
