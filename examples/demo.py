"""The demo: N:M masks for a small Flax model's parameters, with a sparsity summary.

Run with ``python examples/demo.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

import nmjax
from nmjax.tree import MaskRule, apply_masks, build_masks, summarize


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN: two convolutions and a two-layer MLP head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


def main() -> None:
    model = SmallCNN()
    x = jnp.ones((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    # The first conv has I = 3 input channels: not divisible by 4, so it stays dense.
    rule = MaskRule("2:4", skip_indivisible=True)
    masks = build_masks(params, rule)
    print(f"nmjax {nmjax.__version__}: 2:4 masks along each kernel's contraction axis\n")
    print(summarize(params, masks, rule))
    sparse = apply_masks(params, masks)
    for masks_leaf in jax.tree.leaves(masks, is_leaf=nmjax.tree.is_masks_leaf):
        if masks_leaf is None:
            continue
        mask = masks_leaf.fwd  # Dense (in, out) and Conv HWIO: groups along axis ndim - 2
        assert bool(nmjax.masks.is_nm(mask, 2, 4, axis=mask.ndim - 2, exact=True))
    y_dense = model.apply({"params": params}, x)
    y_sparse = model.apply({"params": sparse}, x)
    print(f"\nlogits change after pruning: {float(jnp.linalg.norm(y_sparse - y_dense)):.4f}")


if __name__ == "__main__":
    main()
