"""nmjax: N:M structured-sparse training for JAX and Flax, sparse in both directions."""

from nmjax import format, masks, tree  # noqa: A004

__version__ = "0.1.0"

__all__ = ["format", "masks", "tree"]
