"""Compiles sharded training steps on 8 host devices and prints their collectives as JSON;
run by tests/test_collectives.py in a fresh process (the device count is fixed at start).

``python tests/collectives_worker.py``: for FSDP (kernels split along their contraction
axis), TP (along their output axis) and both, one line ``{"mode", "pattern", "shardings",
"collectives": {kind: [count, bytes]}}`` per step: dense Adam, and ``nmjax.optim.sparse``
around the same Adam with 2:4, transposable and Bi-Mask masks refreshed (and, for Bi-Mask,
permutations searched) every step; and, for some modes and patterns, ``{"same_masks"}``:
whether two sharded refreshes give the unsharded run's masks.
"""

from __future__ import annotations

import json
import os
import sys

D, F, BATCH = 256, 1024, 16


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import nmjax
    from nmjax._hlo import collectives
    from nmjax.masks import as_pattern
    from nmjax.plan import Layout, LeafPlan, Plan
    from nmjax.tree import MaskRule

    def plan_for(spec):
        pattern = as_pattern(spec)
        return Plan(tuple(
            LeafPlan(f"{name}/kernel", "dot_general", Layout(shape, (), (0,), (1,)), pattern,
                     MaskRule(pattern)) for name, shape in (("up", (D, F)), ("down", (F, D)))))

    meshes = {
        "fsdp": (jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,)),
                 P("fsdp", None)),
        "tp": (jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Auto,)), P(None, "tp")),
        "both": (jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2),
                 P("fsdp", "tp")),
    }

    def compile_step(mode, spec, with_shardings):
        mesh, kernel_spec = meshes[mode]
        sh = {name: {"kernel": NamedSharding(mesh, kernel_spec)} for name in ("up", "down")}
        params = {"up": {"kernel": jax.ShapeDtypeStruct((D, F), jnp.float32)},
                  "down": {"kernel": jax.ShapeDtypeStruct((F, D), jnp.float32)}}
        if spec is None:
            tx = optax.adam(1e-3)
        else:
            tx = nmjax.optim.sparse(optax.adam(1e-3), plan_for(spec), refresh_every=1,
                                    perm_every=1 if "bimask" in spec else None,
                                    shardings=sh if with_shardings else None)
        state = jax.eval_shape(tx.init, params)

        def state_sharding(path, leaf):
            # moments and masks laid out like their kernels, Bi-Mask permutations like
            # their output axis
            name = jax.tree_util.keystr(path)
            for layer in ("up", "down"):
                if f"'{layer}'" in name and leaf.ndim == 2:
                    return sh[layer]["kernel"]
                if f"'{layer}'" in name and leaf.ndim == 1 and ".perm" in name:
                    return NamedSharding(mesh, P(kernel_spec[1]))
            return NamedSharding(mesh, P())

        state_sh = jax.tree_util.tree_map_with_path(state_sharding, state)
        batch = NamedSharding(mesh, P())

        def step(params, state, x, y):
            masks = None if spec is None else nmjax.optim.masks_of(state)

            def loss(p):
                up, down = p["up"]["kernel"], p["down"]["kernel"]
                if masks is not None:
                    up, down = up * masks["up"]["kernel"].fwd, down * masks["down"]["kernel"].fwd
                return jnp.mean((jax.nn.relu(x @ up) @ down - y) ** 2)

            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        x = jax.ShapeDtypeStruct((BATCH, D), jnp.float32)
        compiled = jax.jit(step, in_shardings=(sh, state_sh, batch, batch),
                           out_shardings=(sh, state_sh), donate_argnums=(0, 1)).lower(
            params, state, x, x).compile()
        return collectives(compiled.as_text())

    import numpy as np

    rng = np.random.default_rng(0)
    values = {"up": {"kernel": rng.standard_normal((D, F)).astype(np.float32)},
              "down": {"kernel": rng.standard_normal((F, D)).astype(np.float32)}}
    grads = jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), values)

    def bimask_steps(sh):
        """Parameters and masks after two steps of Bi-Mask with a search every step."""
        tx = nmjax.optim.sparse(optax.adam(1e-1), plan_for("2:4 bimask"), refresh_every=1,
                                perm_every=1, shardings=sh)
        params, g = jax.device_put(values, sh), jax.device_put(grads, sh)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(2):
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        return (jax.tree.map(np.asarray, params),
                jax.tree.map(np.asarray, nmjax.optim.masks_of(state)))

    def masks_after_steps(spec, sh):
        """Masks after two refreshes of the given values, sharded by ``sh`` or not."""
        tx = nmjax.optim.sparse(optax.adam(1e-1), plan_for(spec), refresh_every=1,
                                perm_every=1 if "bimask" in spec else None, shardings=sh)
        place = (lambda t: jax.device_put(t, sh)) if sh else (lambda t: t)
        params, g = place(values), place(grads)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(2):
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        return jax.tree.map(np.asarray, nmjax.optim.masks_of(state))

    unsharded = {}
    for mode, spec in (("fsdp", "2:4 transposable"), ("tp", "2:4 transposable"),
                       ("both", "2:4 transposable"), ("both", "2:4"), ("fsdp", "2:4 bimask")):
        mesh, kernel_spec = meshes[mode]
        sh = {name: {"kernel": NamedSharding(mesh, kernel_spec)} for name in ("up", "down")}
        if spec not in unsharded:  # the same for every mesh: computed once per pattern
            unsharded[spec] = masks_after_steps(spec, None)
        same = jax.tree.all(jax.tree.map(np.array_equal, masks_after_steps(spec, sh),
                                         unsharded[spec]))
        print(json.dumps({"mode": mode, "pattern": spec, "same_masks": bool(same)}),
              flush=True)

    from nmjax.masks import BiMask
    from nmjax.plan import from_axis, layout_masks

    for mode in ("tp", "both"):  # output split: each shard searches its own channels
        mesh, kernel_spec = meshes[mode]
        sh = {name: {"kernel": NamedSharding(mesh, kernel_spec)} for name in ("up", "down")}
        params, masks = bimask_steps(sh)
        parts = mesh.shape["tp"]
        for name in ("up", "down"):
            w, got = params[name]["kernel"], masks[name]["kernel"]
            width = w.shape[1] // parts
            blocks = np.sort(got.perm.reshape(parts, width), axis=1)
            want = layout_masks(BiMask(2, 4), w, from_axis(w.shape, 0), got.perm)
            print(json.dumps({
                "mode": mode, "pattern": "2:4 bimask", "kernel": name,
                # a permutation of each shard's own channels, moved by the search
                "perm_within_shards": bool((blocks == np.arange(w.shape[1]).reshape(
                    parts, width)).all()),
                "searched": bool((got.perm != np.arange(w.shape[1])).any()),
                # the sharded masks are the unsharded masks for that permutation
                "same_masks": bool(np.array_equal(want.fwd, got.fwd)
                                   and np.array_equal(want.bwd, got.bwd))}), flush=True)

    # init_masks whose permutation moves channels across output shards: refused at init
    mesh, kernel_spec = meshes["tp"]
    sh = {name: {"kernel": NamedSharding(mesh, kernel_spec)} for name in ("up", "down")}
    pattern = as_pattern("2:4 bimask")
    given = {name: {"kernel": pattern(jnp.asarray(v["kernel"]), perm=jnp.roll(
        jnp.arange(v["kernel"].shape[1]), 1))} for name, v in values.items()}
    tx = nmjax.optim.sparse(optax.adam(1e-1), plan_for("2:4 bimask"), init_masks=given,
                            shardings=sh)
    try:
        tx.init(jax.device_put(values, sh))
        refused = ""
    except ValueError as err:
        refused = str(err)
    print(json.dumps({"crossing_perm_refused": refused}), flush=True)
    # ... and, put into the state under jit, refused by the refresh's check in each shard
    tx = nmjax.optim.sparse(optax.adam(1e-1), plan_for("2:4 bimask"), shardings=sh)
    params = jax.device_put(values, sh)
    state = tx.init(params)
    packed = state.masks["up"]["kernel"]
    bad = packed._replace(perm=jnp.roll(packed.perm, 1))
    state = state._replace(masks={**state.masks, "up": {"kernel": bad}})
    try:
        jax.block_until_ready(jax.jit(tx.update)(grads, state, params))
        raised = ""
    except Exception as err:  # noqa: BLE001 - the host callback's error, wrapped by jax
        raised = str(err)
    print(json.dumps({"crossing_perm_raised": raised[-600:]}), flush=True)

    for mode in meshes:
        runs = [(None, False), ("2:4", True), ("2:4 transposable", True), ("2:4 bimask", True)]
        if mode != "tp":
            runs.append(("2:4 transposable", False))
        for spec, with_shardings in runs:
            found = compile_step(mode, spec, with_shardings)
            print(json.dumps({"mode": mode, "pattern": spec, "shardings": with_shardings,
                              "collectives": found}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
