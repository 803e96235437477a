"""A sharded sparse training step, run by tests/test_optim.py in fresh processes.

``python tests/distributed_worker.py mesh8 OUT``: one process with 8 CPU devices (a 2 x 4
data x model mesh); ``... process I N PORT OUT``: process I of N on localhost, each with
8 / N CPU devices, over JAX's own multi-process runtime (``jax.distributed``, gloo CPU
collectives). Each writes the final parameters to ``OUT`` (``.npz``); the test compares them
with the unsharded run of the same step in its own process (:func:`train`).
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 3
D, H, OUT_DIM, BATCH = 16, 32, 16, 16


def setup_devices(count: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def make():
    """(model, rule, tx, params, batches): the same problem in every process."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    import nmjax
    from nmjax.tree import MaskRule

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(H, name="up")(x))
            return nn.Dense(OUT_DIM, name="down")(x)

    rule = nmjax.resolve(MLP(), MaskRule("2:4"), jnp.ones((1, D)))     # the plan
    tx = nmjax.optim.sparse(optax.adam(1e-2), rule, refresh_every=2, decay=1e-3)
    rng = np.random.default_rng(0)
    batches = rng.standard_normal((STEPS, BATCH, D)).astype(np.float32)
    targets = rng.standard_normal((STEPS, BATCH, OUT_DIM)).astype(np.float32)
    params = MLP().init(jax.random.key(0), jnp.ones((1, D)))["params"]
    params = jax.tree.map(np.asarray, params)
    model = nmjax.nn.sparsify(MLP(), rule, mode="static")
    return model, rule, tx, params, batches, targets


def train(shard=None):
    """Runs STEPS jitted steps; ``shard(name, array)`` places each input (default: as is)."""
    import jax
    import jax.numpy as jnp
    import optax

    import nmjax

    model, rule, tx, params, batches, targets = make()
    place = shard or (lambda name, a: jnp.asarray(a))
    params = {layer: {k: place(f"{layer}/{k}", v) for k, v in leaves.items()}
              for layer, leaves in params.items()}
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        masks = nmjax.nn.collection(opt_state)

        def loss(p):
            out = model.apply({"params": p, "nm_masks": masks}, x)
            return jnp.mean((out - y) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for t in range(STEPS):
        params, opt_state = step(params, opt_state, place("x", batches[t]),
                                 place("y", targets[t]))
    return params, opt_state


def specs():
    """Data parallel over "data"; the up-projection split along out, the down-projection
    along in (its contraction axis: 32 / 4 = 8 rows per shard, whole groups of 4)."""
    from jax.sharding import PartitionSpec as P

    return {"x": P("data", None), "y": P("data", None), "up/kernel": P(None, "model"),
            "up/bias": P("model"), "down/kernel": P("model", None), "down/bias": P(None)}


def run_sharded(mesh, out: str) -> None:
    import jax
    from jax.sharding import NamedSharding

    table = specs()

    def shard(name, a):
        sharding = NamedSharding(mesh, table[name])
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    params, opt_state = train(shard)
    import nmjax

    masks = nmjax.optim.masks_of(opt_state)
    # The state carries the parameters' shardings: each mask is laid out like its kernel.
    for layer in ("up", "down"):
        kernel, mask = params[layer]["kernel"], masks[layer]["kernel"].fwd
        assert mask.sharding.is_equivalent_to(kernel.sharding, kernel.ndim), (
            layer, mask.sharding, kernel.sharding)
        print(f"{layer}: kernel and masks sharded {kernel.sharding.spec}")
    from jax.experimental import multihost_utils

    def gather(a):
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    flat = {f"{layer}/{k}": gather(v) for layer, leaves in params.items()
            for k, v in leaves.items()}
    flat.update({f"mask:{layer}": gather(m["kernel"].fwd) for layer, m in masks.items()})
    if jax.process_index() == 0:
        np.savez(out, **flat)


def auto_mesh(shape):
    """A ``data x model`` mesh in JAX's automatic (GSPMD) sharding mode."""
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "mesh8":
        setup_devices(8)
        import jax

        run_sharded(auto_mesh((2, 4)), argv[1])
        # A mesh whose shards split a group of 4 is refused at init, naming the leaf.
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import nmjax
        from nmjax.tree import MaskRule

        bad = auto_mesh((1, 8))
        _, rule, tx, params, _, _ = make()
        # up/kernel (16, 32) split 8 ways along its contraction axis: shards of 2 rows.
        kernel = jax.device_put(params["up"]["kernel"], NamedSharding(bad, P("model", None)))
        try:
            nmjax.optim.sparse(__import__("optax").sgd(0.1), MaskRule("2:4", axis=0)).init(
                {"up": {"kernel": kernel}})
        except ValueError as e:
            assert "'up/kernel'" in str(e) and "8 ways" in str(e), e
            print("refused:", e)
        else:
            raise AssertionError("a mesh splitting groups of 4 was accepted")
        # The same check under jit(tx.init), on the shardings the compiler sees.
        tx = nmjax.optim.sparse(__import__("optax").sgd(0.1), MaskRule("2:4", axis=0))
        try:
            jax.jit(tx.init)({"up": {"kernel": kernel}})
        except Exception as e:  # raised from a compile-time callback: a JaxRuntimeError
            assert "'up/kernel'" in str(e) and "8 ways" in str(e), e
            print("refused under jit: leaf 'up/kernel'")
        else:
            raise AssertionError("jit(tx.init) accepted a mesh splitting groups of 4")
    elif mode == "process":
        index, count, port, out = int(argv[1]), int(argv[2]), argv[3], argv[4]
        setup_devices(8 // count)
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=index,
                                   initialization_timeout=60)
        assert jax.device_count() == 8, jax.device_count()
        run_sharded(auto_mesh((2, 4)), out)
        jax.distributed.shutdown()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
