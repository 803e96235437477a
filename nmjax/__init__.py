"""nmjax: N:M structured-sparse training for JAX and Flax, sparse in both directions."""

from nmjax import format, masks, nn, ops, tree  # noqa: A004

__version__ = "0.1.0"

__all__ = ["format", "masks", "nn", "ops", "tree"]
