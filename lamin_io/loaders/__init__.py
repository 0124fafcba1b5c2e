"""PyTorch data loading across many AnnData files (datasets, samplers, sharding)."""

__all__: list[str] = []
