"""Sparse training as one optax transformation: masks, refreshes, Bi-Mask search, SR-STE.

:func:`sparse` wraps any optax transformation. Its state holds the step count and the
current :class:`~nmjax.masks.Masks` of every parameter a :class:`~nmjax.tree.MaskRule`
selects (with Bi-Mask permutations); each update adds SR-STE's decay, runs the inner
transformation, and refreshes the masks (and permutations) from the updated parameters on
schedule, under ``lax.cond``, so the whole step stays one compiled program. Sparse layers in
``mode="static"`` read the masks: :func:`nmjax.nn.collection` (Linen's ``"nm_masks"``),
:func:`nmjax.nn.sync` (NNX's ``NMMask`` variables).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nmjax import _checks
from nmjax._packed_masks import PackedMasks, expand, normalize, pack
from nmjax._sharded_refresh import (
    local_masks,
    local_search,
    out_blocks,
    shardings_by_path,
)
from nmjax.masks import BiMask, Masks, Pattern, as_pattern, is_permutation
from nmjax.ops import sr_ste_term
from nmjax.plan import (
    LeafPlan,
    Plan,
    as_rules,
    layout_reason,
    layout_search,
    layout_valid,
    plan_for_params,
)
from nmjax.tree import MaskRule, check_structure, is_masks_leaf, path_str

Stages = tuple[tuple[int, Pattern | None], ...]
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class SparseState(NamedTuple):
    """State of :func:`sparse`.

    Attributes:
      count: int32 number of updates applied.
      masks: the parameters' tree with a :class:`~nmjax._packed_masks.PackedMasks` at each
        selected leaf and ``None`` elsewhere: the masks the next forward pass uses, bit-packed
        (1 bit per weight per stored mask; ``bwd`` stored only when a pattern makes it
        differ from ``fwd``). :func:`masks_of` gives them as :class:`~nmjax.masks.Masks`.
      inner_state: the wrapped transformation's state.
      key: uint32 PRNG key data for the Bi-Mask permutation search.
      refreshes: int32 number of mask refreshes so far (the one at ``init`` not counted).
      searches: int32 number of permutation searches so far.
    """

    count: jax.Array
    masks: Any
    inner_state: Any
    key: jax.Array
    refreshes: jax.Array
    searches: jax.Array


# --------------------------------------------------------------------------- schedules


def nm_schedule(final: Pattern | str, *, warmup: int = 0, ramp: int = 0,
                finetune_from: int | None = None) -> Stages:
    """Stages from dense to ``final`` N:M and optionally back to dense, for :func:`sparse`.

    * steps ``[0, warmup)``: dense (masks keep everything);
    * ``[warmup, warmup + ramp)``: a gradual ramp through ``(m-1):m, (m-2):m, ...`` down to
      ``final``'s ``n`` (the same pattern kind), in equal steps;
    * from ``warmup + ramp``: ``final``;
    * from ``finetune_from`` (if given): dense fine-tuning.

    >>> [(start, p.label if p else "dense") for start, p in nm_schedule("2:4", warmup=100,
    ...  ramp=200, finetune_from=1000)]
    [(0, 'dense'), (100, '3:4 nm'), (300, '2:4 nm'), (1000, 'dense')]

    Returns:
      ``((start_step, pattern or None), ...)`` with strictly increasing starts from 0.
    """
    final = as_pattern(final)
    warmup = _checks.check_step(warmup, "warmup", 0)
    ramp = _checks.check_step(ramp, "ramp", 0)
    stages: list[tuple[int, Pattern | None]] = []
    if warmup:
        stages.append((0, None))
    if ramp:
        if not hasattr(final, "n") or not dataclasses.is_dataclass(final):
            raise ValueError(f"a ramp needs an N:M pattern with an n to vary, got {final!r}")
        ns = list(range(final.m - 1, final.n, -1))
        if not ns:
            raise ValueError(f"ramp={ramp} needs n < m - 1 to pass through denser patterns, "
                             f"got {final.label!r}")
        if ramp < len(ns):
            names = ", ".join(f"{n}:{final.m}" for n in ns)
            raise ValueError(
                f"ramp={ramp} is shorter than the {len(ns)} intermediate patterns of a ramp "
                f"to {final.label!r} ({names}), which take one step each at least: pass "
                f"ramp >= {len(ns)}")
        for i, n in enumerate(ns):
            stages.append((warmup + (ramp * i) // len(ns), dataclasses.replace(final, n=n)))
    stages.append((warmup + ramp, final))
    if finetune_from is not None:
        finetune_from = _checks.check_step(finetune_from, "finetune_from", 0)
        if finetune_from <= warmup + ramp:
            raise ValueError(f"finetune_from={finetune_from} must come after the sparse phase "
                             f"starts (step {warmup + ramp})")
        stages.append((finetune_from, None))
    return check_stages(stages)


def check_stages(stages: Any) -> Stages:
    """Validates ``((start_step, pattern | shorthand | None), ...)``: starts strictly
    increasing from 0; returns them with patterns as specs."""
    if isinstance(stages, str) or not isinstance(stages, Sequence) or not stages:
        raise TypeError(f"stages must be a non-empty sequence of (start_step, pattern) pairs, "
                        f"got {stages!r}")
    out = []
    for item in stages:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"each stage must be a (start_step, pattern or None) pair, "
                            f"got {item!r}")
        start = _checks.check_step(item[0], "stage start", 0)
        out.append((start, None if item[1] is None else as_pattern(item[1])))
    starts = [s for s, _ in out]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"stage starts must begin at 0 and increase strictly, got {starts}")
    return tuple(out)


def stage_at(stages: Stages, step: int) -> int:
    """Index of the stage that step ``step`` (a Python int) runs in."""
    return sum(1 for start, _ in stages if step >= start) - 1


def pattern_at(stages: Stages, step: int) -> Pattern | None:
    """The pattern step ``step`` trains with (``None``: dense). Use it to pick the model a
    training loop runs at each step: the dense one, or the one sparsified with this pattern."""
    return stages[stage_at(stages, step)][1]


# ----------------------------------------------------------------------------- checks


def _check_interval(value: Any, name: str) -> Any:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(value, int | np.integer):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (steps between refreshes), got {value}")
        return _checks.check_step(value, name, 1)
    arr = jnp.asarray(value)
    if arr.ndim or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if _checks.is_concrete(arr) and int(arr) < 1:
        raise ValueError(f"{name} must be >= 1 (steps between refreshes), got {int(arr)}")
    return arr


def _decay_at(decay: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    value = decay(count) if callable(decay) else decay
    value = jnp.asarray(value, jnp.float32)
    if value.ndim:
        raise TypeError(f"decay must be a scalar or a schedule of scalars, got shape "
                        f"{value.shape}")
    return value


def _mesh_axis_size(sharding: Any, dim: int) -> int:
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None or dim >= len(spec) or spec[dim] is None:
        return 1
    names = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
    return math.prod(mesh.shape[n] for n in names)


Target = Plan | tuple[MaskRule, ...]


def as_target(rule: Any) -> Target:
    """A :class:`~nmjax.plan.Plan` as it is, or rules (:func:`nmjax.plan.as_rules`)."""
    return rule if isinstance(rule, Plan) else as_rules(rule)


def plan_of(params: Any, rule: Any) -> Plan:
    """The plan ``rule`` gives for ``params``: a :class:`~nmjax.plan.Plan` checked against
    the tree, or rules resolved from the parameters alone
    (:func:`nmjax.plan.plan_for_params`: Linen auto-named ``Dense_<i>``/``Conv_<i>`` layers
    and ``MaskRule(axis=...)``; anything else needs ``nmjax.resolve(model, rule, x)``)."""
    target = as_target(rule)
    if isinstance(target, Plan):
        target.check_params(params)
        return target
    return plan_for_params(params, target)


def select(params: Any, rule: Any) -> list[tuple[str, Any, LeafPlan]]:
    """``[(path, leaf, LeafPlan)]`` of the parameters the plan (or rule) makes sparse, in
    tree order."""
    plan = plan_of(params, rule)
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return [(leaf.path, flat[leaf.path], leaf) for leaf in plan.leaves]


def _shard_chunks(shape: tuple[int, ...], axes: tuple[int, ...], sharding: Any
                  ) -> list[tuple[int, int]]:
    """``[(axis, contiguous run of the flattened axes one shard holds)]`` for each of
    ``axes`` that ``sharding`` splits."""
    out = []
    for i, axis in enumerate(axes):
        parts = _mesh_axis_size(sharding, axis)
        if parts > 1:
            inner = math.prod(shape[a] for a in axes[i + 1:])
            out.append((axis, (shape[axis] // parts if shape[axis] % parts == 0 else 0) * inner,
                        parts))
    return out


def check_sharding(params: Any, rule: Any, shardings: Any = None) -> None:
    """Raises ValueError where a sharding would split an N:M group or tile across shards.

    Every sparse parameter's contraction (and, for transposable and Bi-Mask patterns, its
    output) must split into shards whose runs along the flattened axes are multiples of
    ``m``.

    Args:
      params: the parameters (arrays carrying ``NamedSharding``s, or shape structs).
      rule: a :class:`~nmjax.plan.Plan` or rules (:func:`plan_of`).
      shardings: a tree of shardings like ``params`` (default: each leaf's own
        ``.sharding``).
    """
    by_path = {}
    if shardings is not None:
        flat = jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda s: hasattr(s, "spec") or s is None)[0]
        by_path = {path_str(p): s for p, s in flat}
    for path, leaf, planned in select(params, rule):
        sharding = by_path.get(path, getattr(leaf, "sharding", None))
        if sharding is not None:
            _check_leaf_sharding(path, planned, sharding)


def _check_leaf_sharding(path: str, planned: LeafPlan, sharding: Any) -> None:
    """:func:`check_sharding` for one leaf."""
    pattern, layout = planned.pattern, planned.layout
    groups = [(layout.contract, "contraction", pattern.fwd_nm)]
    if pattern.bwd_nm is not None:
        groups.append((layout.out, "output", pattern.bwd_nm))
    for axes, what, nm in groups:
        m = (nm or (1, 1))[1]
        for axis, run, parts in _shard_chunks(layout.shape, axes, sharding):
            if run == 0 or run % m:
                raise ValueError(
                    f"leaf {path!r} of shape {layout.shape} is sharded {parts} ways along "
                    f"its {what} axis {axis} (shards of "
                    f"{layout.shape[axis] / parts:g}), which splits groups of m={m}: "
                    f"shard a different axis, or use a mesh whose shards along axis "
                    f"{axis} are multiples of {m}")


def _check_traced_sharding(chosen: list[tuple[str, Any, LeafPlan]]) -> None:
    """Under ``jit``: the same check on the shardings the compiler gives the traced
    leaves (``jax.debug.inspect_array_sharding`` calls back at compile time)."""
    for path, leaf, planned in chosen:
        if not _checks.is_concrete(leaf):
            jax.debug.inspect_array_sharding(
                leaf, callback=functools.partial(_check_leaf_sharding, path, planned))


# ------------------------------------------------------------------------------- masks


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the transformation knows statically. ``stages`` of ``None`` patterns mean
    dense; with no stages given each leaf takes its plan's pattern."""

    target: Target
    stages: Stages | None
    with_perm: bool
    shardings: tuple[tuple[str, Any], ...] = ()  # (path, NamedSharding): shard-local refresh

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.stages) if self.stages else (0,)

    def resolve(self, params: Any) -> Plan:
        return plan_of(params, self.target)

    def patterns(self, plan: Plan, stage: int) -> dict[str, Pattern | None]:
        if not self.stages:
            return {leaf.path: leaf.pattern for leaf in plan.leaves}
        return {leaf.path: self.stages[stage][1] for leaf in plan.leaves}

    def masks(self, params: Any, stage: int, perms: Mapping[str, Any],
              check_perms: bool = False) -> tuple[Any, frozenset[str]]:
        """Masks of ``params`` for stage ``stage`` (a Python int), and the paths whose
        masks ran shard by shard (their permutations checked there when ``check_perms``)."""
        plan = self.resolve(params)
        patterns = self.patterns(plan, stage)
        local = _local_masks(plan, params, patterns, perms, dict(self.shardings),
                             self.with_perm, check_perms)
        rest = {path: None if path in local else p for path, p in patterns.items()}
        masks = plan.masks(params, rest, perms, self.with_perm)
        return jax.tree_util.tree_map_with_path(
            lambda p, m: local.get(path_str(p), m), masks, is_leaf=is_masks_leaf
        ), frozenset(local)

    def patterns_of(self, plan: Plan, path: str) -> list[Pattern | None]:
        """The patterns leaf ``path`` takes over all stages."""
        return [self.patterns(plan, i)[path] for i in range(len(self.starts))]

    def same_masks(self, plan: Plan) -> dict[str, bool]:
        """Per leaf: whether every stage's pattern makes ``bwd`` equal ``fwd`` (so the
        state stores ``fwd`` alone; dense stages keep everything in both)."""
        stages = range(len(self.starts))
        return {leaf.path: all(p is None or p.same_masks
                               for p in (self.patterns(plan, i)[leaf.path] for i in stages))
                for leaf in plan.leaves}

    def pack(self, params: Any, masks: Any) -> Any:
        """``masks`` (a tree of :class:`~nmjax.masks.Masks`) as the state holds them."""
        plan = self.resolve(params)
        same = self.same_masks(plan)
        layouts = {leaf.path: leaf.layout for leaf in plan.leaves}

        def one(key_path, m):
            if m is None:
                return None
            path = path_str(key_path)
            return pack(m, layouts[path], same[path])

        return jax.tree_util.tree_map_with_path(one, masks, is_leaf=is_masks_leaf)

    def search(self, params: Any, stage: int, key: jax.Array, masks: Any) -> dict[str, Any]:
        """New Bi-Mask permutations (warm-started from ``masks``) of the leaves whose pattern
        at ``stage`` is Bi-Mask."""
        perms = _perms(masks)
        plan = self.resolve(params)
        patterns = self.patterns(plan, stage)
        chosen = [(path, leaf, patterns[path]) for path, leaf, _ in select(params, plan)
                  if isinstance(patterns[path], BiMask)]
        keys = jax.random.split(key, max(len(chosen), 1))
        layouts = {leaf.path: leaf.layout for leaf in plan.leaves}
        shardings = dict(self.shardings)
        for (path, leaf, pattern), k in zip(chosen, keys, strict=False):
            # "swap" improves the current permutation; "random" draws fresh candidates.
            init = perms.get(path) if pattern.search == "swap" else None
            found = None
            if path in shardings:  # output split: each shard permutes its own channels
                found = local_search(pattern, leaf, layouts[path], shardings[path], k, init)
            perms[path] = (found if found is not None
                           else layout_search(pattern, leaf, layouts[path], k, init=init))
        return perms

    def refresh(self, stage: int, params: Any, masks: Any, key: jax.Array,
                do_search: jax.Array, *, check_perms: bool) -> Any:
        """The masks of (updated) ``params`` for ``stage`` (a Python int), after a Bi-Mask
        permutation search when ``do_search`` (a traced bool) holds."""
        perms = jax.lax.cond(do_search, lambda: self.search(params, stage, key, masks),
                             lambda: _perms(masks))
        new_masks, checked = self.masks(params, stage, perms, check_perms)
        if check_perms:
            _check_perms(new_masks, skip=checked)
        return new_masks

    def refresh_at(self, stage: jax.Array, params: Any, masks: Any, key: jax.Array,
                   do_search: jax.Array, *, check_perms: bool) -> Any:
        """:meth:`refresh` for a traced stage index: one ``lax.switch`` branch per stage."""
        branches = [functools.partial(self.refresh, i, check_perms=check_perms)
                    for i in range(len(self.starts))]
        if len(branches) == 1:
            return branches[0](params, masks, key, do_search)
        return jax.lax.switch(stage, branches, params, masks, key, do_search)


def _local_masks(plan: Plan, params: Any, patterns: Mapping[str, Pattern | None],
                 perms: Mapping[str, Any], shardings: Mapping[str, Any], with_perm: bool,
                 check_perms: bool = False) -> dict[str, Masks]:
    """``{path: Masks}`` of the leaves whose masks each shard computes alone
    (:mod:`nmjax._sharded_refresh`); the others are left out. ``check_perms``: each shard
    checks its block of a Bi-Mask permutation (a permutation of its own channels)."""
    if not shardings:
        return {}
    flat = {path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for leaf in plan.leaves:
        pattern, sharding = patterns[leaf.path], shardings.get(leaf.path)
        if sharding is None or pattern is None:
            continue
        perm = perms.get(leaf.path) if isinstance(pattern, BiMask) else None
        check = None
        if check_perms and perm is not None:
            check = functools.partial(_check_local_perm, leaf.path)
        masks = local_masks(pattern, flat[leaf.path], leaf.layout, sharding, perm, check)
        if masks is None:
            continue
        if with_perm and masks.perm is None:
            width = leaf.layout.sizes[2]
            masks = masks._replace(perm=jnp.broadcast_to(
                jnp.arange(width, dtype=jnp.int32), leaf.layout.perm_shape))
        out[leaf.path] = masks
    return out


def _perms(masks: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masks_leaf)[0]
    return {path_str(p): m.perm for p, m in flat if isinstance(m, Masks) and m.perm is not None}


def _normalize_masks(tree: Any) -> Any:
    """Masks trees back as :class:`PackedMasks` / :class:`~nmjax.masks.Masks` where a
    container rebuilt them as mappings (flax NNX)."""
    return normalize(tree)


def _raise_bad_perms(paths: tuple[str, ...], ok: Any) -> None:
    bad = [path for path, good in zip(paths, np.asarray(ok), strict=True) if not good]
    if bad:
        raise ValueError(f"the Bi-Mask permutation of {bad} is not a permutation of the "
                         "output channels (repeated or out-of-range indices): its backward "
                         "mask would be wrong and dX silently wrong; was the optimizer state's "
                         "perm replaced?")


def _raise_bad_local_perm(path: str, ok: Any) -> None:
    if not bool(np.asarray(ok)):
        raise ValueError(f"the Bi-Mask permutation of {path!r} is not a permutation of each "
                         "output shard's own channels (a channel moved across shards, or "
                         "repeated or out-of-range indices): a kernel sharded along its output "
                         "keeps its permutation within each shard; was the optimizer state's "
                         "perm replaced?")


def _check_local_perm(path: str, ok: jax.Array) -> None:
    """Inside a shard: raises (host callback) where the shard's block of ``path``'s
    permutation is not a permutation of the shard's own output channels."""
    jax.debug.callback(functools.partial(_raise_bad_local_perm, path), ok)


def _check_perms(masks: Any, skip: frozenset[str] = frozenset()) -> None:
    """Raises (from the compiled step, through a host callback) where a refreshed mask's
    permutation is not one: the products trust traced permutations. ``skip``: paths
    checked shard by shard (:func:`_check_local_perm`)."""
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masks_leaf)[0]
    found = [(path_str(p), m.perm) for p, m in flat
             if isinstance(m, Masks) and m.perm is not None and path_str(p) not in skip]
    if found:
        # one permutation per stacked matrix (scan-stacked layers, dot_general batch axes)
        ok = jnp.stack([jnp.all(jax.vmap(is_permutation)(perm.reshape(-1, perm.shape[-1])))
                        for _, perm in found])
        jax.debug.callback(functools.partial(_raise_bad_perms, tuple(p for p, _ in found)), ok)


def _stage_index(starts: tuple[int, ...], step: jax.Array) -> jax.Array:
    return jnp.sum(step >= jnp.asarray(starts, jnp.int32), dtype=jnp.int32) - 1


def _check_init_masks(params: Any, masks: Any, plan: Plan, tx_plan: _Plan) -> Any:
    """``init_masks`` checked: the parameters' structure, a Masks at exactly the planned
    leaves, the leaves' shapes, and (where concrete) what the stage-0 patterns promise."""
    check_structure(params, masks, "init_masks")
    flat = {path_str(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masks_leaf)[0]}
    wanted = set(plan.paths)
    have = {path for path, m in flat.items() if m is not None}
    if wanted != have:
        raise ValueError(f"init_masks must hold masks at exactly the selected leaves: missing "
                         f"{sorted(wanted - have)}, extra {sorted(have - wanted)}")
    patterns = tx_plan.patterns(plan, 0)
    same = tx_plan.same_masks(plan)
    for leaf in plan.leaves:
        m = flat[leaf.path]
        for name in ("fwd", "bwd"):
            got = getattr(m, name)
            if tuple(got.shape) != leaf.shape or got.dtype != jnp.bool_:
                raise ValueError(f"init_masks {name} mask for {leaf.path!r} is {got.dtype} "
                                 f"{tuple(got.shape)}; the leaf is {leaf.shape} (bool)")
        if (m.perm is not None) != tx_plan.with_perm:
            raise ValueError(f"init_masks for {leaf.path!r}: a Bi-Mask plan needs a perm at "
                             "every leaf, any other plan none")
        if same[leaf.path] and m.bwd is not m.fwd and _checks.is_concrete(m.bwd) and not bool(
                jnp.array_equal(m.fwd, m.bwd)):
            raise ValueError(f"init_masks for {leaf.path!r}: bwd differs from fwd, but the "
                             "patterns make them equal (the state stores fwd alone)")
        pattern = patterns[leaf.path]
        if pattern is not None and _checks.is_concrete(m.fwd) and not bool(
                layout_valid(pattern, m, leaf.layout)):
            raise ValueError(f"init_masks for {leaf.path!r} are not valid {pattern.label!r} "
                             f"masks along its axes ({leaf.layout.describe()})")
    return masks


def _check_perm_blocks(masks: Any, plan: Plan, tx_plan: _Plan) -> None:
    """Raises ValueError where a concrete Bi-Mask permutation of ``init_masks`` moves a
    channel across the output shards its kernel's masks are computed in
    (:func:`nmjax._sharded_refresh.out_blocks`)."""
    shardings = dict(tx_plan.shardings)
    flat = {path_str(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masks_leaf)[0]}
    for leaf in plan.leaves:
        perm = flat[leaf.path].perm
        blocks = max(out_blocks(leaf.layout, p, shardings.get(leaf.path))
                     for p in tx_plan.patterns_of(plan, leaf.path))
        if blocks == 1 or perm is None or not _checks.is_concrete(perm):
            continue
        width = leaf.layout.sizes[2] // blocks
        block_of = np.asarray(perm).reshape(-1, blocks, width) // width
        if not (block_of == np.arange(blocks)[:, None]).all():
            raise ValueError(
                f"init_masks for {leaf.path!r}: its Bi-Mask permutation moves output "
                f"channels across the {blocks} output shards of its sharding (shards of "
                f"{width} channels); a kernel sharded along its output keeps its permutation "
                "within each shard: permute each shard's channels among themselves")


# ---------------------------------------------------------------------------- transform


def sparse(
    inner: optax.GradientTransformation,
    rule: Plan | MaskRule | Pattern | str | Sequence[MaskRule | Pattern | str],
    *,
    refresh_every: int | jax.Array = 1,
    perm_every: int | jax.Array | None = None,
    decay: ScalarOrSchedule = 0.0,
    stages: Sequence[tuple[int, Pattern | str | None]] | None = None,
    seed: int | jax.Array = 0,
    init_masks: Any = None,
    check_perms: bool = True,
    shardings: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that it trains the parameters ``rule`` selects N:M sparse.

    Each update (at step ``t``, counting from 0):

    1. adds SR-STE's ``λ(t) · (1 − fwd) ⊙ W`` to the gradient of every selected parameter
       (the decay then lives here, once: leave the sparse products' own ``decay`` 0, or
       both apply it, 2λ);
    2. runs ``inner``;
    3. computes the updated parameters and, when ``t + 1`` is a multiple of
       ``perm_every``, searches new Bi-Mask permutations (warm-started from the current
       ones); when ``t + 1`` is a multiple of ``refresh_every``, a stage starts, or a search
       ran, recomputes the masks from the updated parameters (``lax.cond``: one program).

    ``refresh_every=1`` recomputes the masks from the current weights at every step, as
    SR-STE's dynamic masks do, at the cost of one mask computation per step (not one per
    forward and one per backward pass, as dynamic layers pay); larger values are "static"
    masks refreshed every ``k`` steps. Run the model's sparse layers in ``mode="static"``,
    reading :func:`masks_of` the state (:func:`nmjax.nn.collection`, :func:`nmjax.nn.sync`).

    Put the wrapper outermost (or last in an ``optax.chain``): it refreshes the masks from
    ``params + inner's updates``, which it cannot tell from what the caller applies. In
    ``optax.chain(sparse(inner, rule), optax.scale(-3))`` the masks come from parameters
    the chain never produces (``params + u`` where the applied ones are ``params - 3u``),
    and nothing raises: write ``sparse(optax.chain(inner, optax.scale(-3)), rule)``.

    A Bi-Mask permutation is trusted by the products, and an invalid one (e.g. a state
    edited under ``jit``) gives an all-false backward mask, so dX of that layer would be
    silently 0. With ``check_perms`` (default) each refresh of a Bi-Mask plan checks the
    permutations and raises from the compiled step (a ``JaxRuntimeError`` naming the leaf,
    through one host callback per refresh); ``check_perms=False`` skips that callback.

    Example (Linen)::

      plan = nmjax.resolve(Model(), MaskRule("2:4 transposable", exclude="head"), x)
      tx = nmjax.optim.sparse(optax.adam(1e-3), plan, refresh_every=100, decay=2e-4)
      opt_state = tx.init(params)
      model = nmjax.nn.sparsify(Model(), plan, mode="static")   # the same plan

      @jax.jit
      def step(params, opt_state, x, y):
          variables = {"params": params, "nm_masks": nmjax.nn.collection(opt_state)}
          grads = jax.grad(lambda p: loss(model.apply({**variables, "params": p}, x), y))(params)
          updates, opt_state = tx.update(grads, opt_state, params)
          return optax.apply_updates(params, updates), opt_state

    Args:
      inner: any optax transformation (``optax.adam(1e-3)``, a chain, ...).
      rule: a :class:`~nmjax.plan.Plan` (:func:`nmjax.resolve`: each parameter's axes read
        from the op that uses it; the model's :func:`nmjax.nn.sparsify` takes the same plan),
        or rules (a :class:`~nmjax.tree.MaskRule`, a pattern spec, ``"2:4"``, or a sequence
        of them) for trees whose layouts are known without the model (Linen auto-named
        ``Dense_<i>``/``Conv_<i>`` layers, ``MaskRule(axis=...)``); any other kernel a rule
        selects is refused at ``init``, with the fix.
      refresh_every: steps between mask refreshes (1 to ``2**31 - 1``: steps count in
        int32; may be traced, e.g. under ``optax.inject_hyperparams``). A refresh solves
        every kernel's mask once: cheap for plain N:M, an exact transposable or Bi-Mask
        solve costs several times more per weight (the README's "At scale" section and
        ``benchmarks/results/scale.md`` give the measured cost per billion weights); a step
        pays it divided by ``refresh_every``.
      perm_every: steps between Bi-Mask permutation searches (the paper: 100); ``None``
        (default) means 100 when a stage is Bi-Mask. Must be ``None`` otherwise.
      decay: SR-STE ``λ`` >= 0 (finite): a float, a JAX scalar, or an optax schedule
        ``step -> λ``.
      stages: ``((start_step, pattern or None), ...)`` (:func:`nm_schedule`): the pattern
        each phase trains with, ``None`` for dense phases (masks keep everything, so no
        decay). Default: each rule's pattern from step 0. All stages share the rule's leaves
        (stages take one rule).
      seed: seeds the permutation search.
      init_masks: the masks to start from (a tree like :func:`masks_of`, e.g. a conversion's
        ``masks``); default: computed from the parameters at ``init``. Checked against the
        parameters' structure and shapes and against what the patterns promise.
      check_perms: check the Bi-Mask permutations at every refresh (see above).
      shardings: a tree like the parameters of their ``NamedSharding``s (``None`` leaves
        allowed), as given to ``jax.jit``: each sharded kernel's refresh then runs on each
        device's own shard (``jax.shard_map``), adding no communication to the step.
        Bi-Mask: a kernel whose output is split keeps its permutation within each output
        shard (each shard searches its own channels; ``init_masks`` whose permutation
        crosses shards are refused), and where the contraction is split the search sums
        its swap gains over the contraction shards (one all-reduce per kernel and round of
        2 floats per output channel of the shard). Lay the state's permutations out like
        their kernel's output axis (``masks_of``'s ``perm``), or XLA gathers them after a
        search. Checked by :func:`check_sharding` at ``init``. Default: the refresh is
        left to XLA's partitioner, which gathers transposable kernels.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

    Raises:
      TypeError / ValueError (at construction or ``init``): a bad interval, decay or stage,
      a rule that selects no parameter, a stage pattern a selected leaf cannot take, a
      sharding that splits a group (:func:`check_sharding`; under ``jit(tx.init)`` it
      raises at compile time, from the shardings the compiler sees); at ``update``:
      ``params`` or the state's masks not of the parameters' structure, or (from the
      compiled step) an invalid Bi-Mask permutation.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got "
                        f"{type(inner).__name__}")
    target = as_target(rule)
    refresh_every = _check_interval(refresh_every, "refresh_every")
    rule_patterns = target.patterns if isinstance(target, Plan) else tuple(
        r.pattern for r in target)
    if stages is not None:
        if len(rule_patterns) > 1:
            raise ValueError(f"stages apply to one pattern; the rule has "
                             f"{len(rule_patterns)}")
        stages = check_stages(stages)
    patterns = [p for _, p in stages] if stages else list(rule_patterns)
    has_bimask = any(isinstance(p, BiMask) for p in patterns)
    if perm_every is None:
        perm_every = 100 if has_bimask else None
    elif not has_bimask:
        raise ValueError("perm_every applies to Bi-Mask patterns; no stage is Bi-Mask")
    if perm_every is not None:
        perm_every = _check_interval(perm_every, "perm_every")
    if not isinstance(check_perms, bool):
        raise TypeError(f"check_perms must be a bool, got {check_perms!r}")
    if not callable(decay):
        decay = _checks.check_decay(decay)
    by_path = shardings_by_path(shardings) if shardings is not None else {}
    transform = _Sparse(optax.with_extra_args_support(inner),
                        _Plan(target, stages, has_bimask, tuple(sorted(by_path.items()))),
                        refresh_every, perm_every, decay, seed, init_masks, check_perms,
                        shardings)
    return optax.GradientTransformationExtraArgs(transform.init, transform.update)


def _check_stage_patterns(chosen: list[tuple[str, Any, LeafPlan]], stages: Stages | None
                          ) -> None:
    """Raises ValueError where a stage's pattern cannot take a selected leaf."""
    for path, leaf, planned in chosen:
        for start, pattern in (stages or ((0, planned.pattern),)):
            reason = None if pattern is None else layout_reason(pattern, planned.layout)
            if reason is not None:
                raise ValueError(f"leaf {path!r} of shape {tuple(leaf.shape)} cannot take "
                                 f"the pattern {pattern.label!r} of the stage from step "
                                 f"{start}: {reason}")


def _add_decay(grads: Any, params: Any, masks: Any, lam: jax.Array) -> Any:
    """SR-STE: ``grads + λ (1 − fwd) ⊙ params`` at the masked leaves."""
    def one(g, w, m):
        return g if m is None else g + sr_ste_term(w, m.fwd, lam).astype(g.dtype)

    return jax.tree.map(one, grads, params, masks, is_leaf=lambda x: x is None)


def _keep_masks(stage, params, masks, key, do_search):
    """The no-refresh branch: the masks as they are."""
    return masks


@dataclasses.dataclass(frozen=True, eq=False)
class _Sparse:
    """:func:`sparse`'s transformation: checked settings, :meth:`init` and :meth:`update`."""

    inner: optax.GradientTransformationExtraArgs
    plan: _Plan
    refresh_every: int | jax.Array
    perm_every: int | jax.Array | None
    decay: ScalarOrSchedule
    seed: int | jax.Array
    init_masks: Any
    check_perms: bool
    shardings: Any

    def init(self, params: Any) -> SparseState:
        resolved = self.plan.resolve(params)
        chosen = select(params, resolved)
        _check_stage_patterns(chosen, self.plan.stages)
        if all(_checks.is_concrete(leaf) for _, leaf, _ in chosen):
            check_sharding(params, resolved)
        else:
            _check_traced_sharding(chosen)
        if self.shardings is not None:
            check_sharding(params, resolved, self.shardings)
        if self.init_masks is not None:
            masks = _check_init_masks(params, _normalize_masks(self.init_masks), resolved,
                                      self.plan)
            _check_perm_blocks(masks, resolved, self.plan)
            # Under jit: own buffers (the state may be donated).
            masks = jax.jit(self.plan.pack)(params, masks)
        else:
            masks = jax.jit(lambda p: self.plan.pack(p, self.plan.masks(p, 0, {})[0]))(params)
        key = jax.random.key_data(jax.random.key(self.seed))
        zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # three buffers: donatable
        return SparseState(zeros[0], masks, self.inner.init(params), key, zeros[1], zeros[2])

    def update(self, updates: Any, state: SparseState, params: Any = None,
               **extra_args: Any) -> tuple[Any, SparseState]:
        """SR-STE decay, the inner update, then (on schedule) the refresh."""
        state = _checked_state(state, params)
        packed = state.masks
        if any(isinstance(m, Masks) for m in jax.tree.leaves(packed, is_leaf=is_masks_leaf)):
            packed = self.plan.pack(params, packed)  # masks set by hand: held packed from here
        masks = expand(packed)  # the state holds them bit-packed: expanded here, in the step
        check_structure(params, masks, "the state's masks")
        grads = _add_decay(updates, params, masks, _decay_at(self.decay, state.count))
        updates, inner_state = self.inner.update(grads, state.inner_state, params,
                                                 **extra_args)
        do_search, do_refresh, stage = self._when(state.count)
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        # The refresh reads the updated parameters, computed here exactly as the caller's
        # ``optax.apply_updates`` computes them, so XLA merges the two and the operand is the
        # step's own output buffer. (Passing the step's inputs instead made XLA copy the
        # donated parameters and the inner state every step, refresh or not, to keep their
        # old values alive for the branch: 8 copies of each kernel's size with Adam.)
        new_params = optax.apply_updates(params, updates)
        refresh = lambda stage, p, _, k, d: self._refresh(stage, p, masks, k, d)  # noqa: E731
        new_masks = jax.lax.cond(do_refresh, refresh, _keep_masks, stage, new_params, packed,
                                 sub, do_search)
        searched = do_search & jnp.asarray(self.plan.with_perm)
        return updates, SparseState(
            state.count + 1, new_masks, inner_state, jax.random.key_data(key),
            state.refreshes + do_refresh.astype(jnp.int32),
            state.searches + searched.astype(jnp.int32))

    def _when(self, count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(do_search, do_refresh, stage of the next step)`` after step ``count``."""
        nxt = count + 1
        stage_now = _stage_index(self.plan.starts, count)
        stage_next = _stage_index(self.plan.starts, nxt)
        do_search = jnp.asarray(False)
        if self.perm_every is not None:
            do_search = (nxt % self.perm_every) == 0
        do_refresh = ((nxt % self.refresh_every) == 0) | (stage_next != stage_now) | do_search
        return do_search, do_refresh, stage_next

    def _refresh(self, stage, params, masks, key, do_search):
        """The refresh branch: :meth:`_Plan.refresh_at`, packed as the state holds masks."""
        return self.plan.pack(params, self.plan.refresh_at(stage, params, masks, key, do_search,
                                                           check_perms=self.check_perms))


def _checked_state(state: Any, params: Any) -> SparseState:
    """``state`` as a :class:`SparseState` whose masks match ``params``."""
    if params is None:
        raise ValueError("nmjax.optim.sparse needs params: tx.update(grads, state, params)")
    if not isinstance(state, SparseState):
        raise TypeError(f"state must be the SparseState this transformation's init made, "
                        f"got {type(state).__name__}")
    return state._replace(masks=_normalize_masks(state.masks))


# ---------------------------------------------------------------------------- accessors


def _find_states(tree: Any) -> list[SparseState]:
    found = []

    def visit(x):
        if isinstance(x, SparseState):
            found.append(x)
        return x

    jax.tree_util.tree_map(visit, tree, is_leaf=lambda x: isinstance(x, SparseState))
    return found


def find_state(opt_state: Any) -> SparseState:
    """The :class:`SparseState` inside an optimizer state (a chain, ``inject_hyperparams``,
    ``multi_transform``, a Flax ``TrainState``'s ``opt_state`` or an ``nnx.Optimizer``), its
    masks expanded to :class:`~nmjax.masks.Masks` (inside a jitted step the expansion is
    part of the step).

    Raises:
      ValueError: none, or more than one, is found.
    """
    if hasattr(opt_state, "opt_state") and not isinstance(opt_state, SparseState):
        opt_state = opt_state.opt_state  # TrainState, nnx.Optimizer
    found = _find_states(_unwrap_nnx(opt_state))
    if len(found) != 1:
        raise ValueError(f"expected one nmjax.optim.SparseState in the optimizer state, found "
                         f"{len(found)}")
    return found[0]._replace(masks=expand(_normalize_masks(found[0].masks)))


def _unwrap_nnx(tree: Any) -> Any:
    """Replaces flax NNX ``Variable`` wrappers by their values (NNX optimizer states)."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return tree
    return jax.tree_util.tree_map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def masks_of(opt_state: Any) -> Any:
    """The current masks: the parameters' tree with a :class:`~nmjax.masks.Masks` at each
    sparse leaf and ``None`` elsewhere."""
    return find_state(opt_state).masks


def param_labels(params: Any, rule: Any, *, sparse_label: str = "sparse",
                 dense_label: str = "dense") -> Any:
    """``params``' tree of labels (``"sparse"`` where ``rule`` selects, ``"dense"``
    elsewhere), for ``optax.multi_transform``."""
    chosen = set(plan_of(params, rule).paths)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: sparse_label if path_str(p) in chosen else dense_label, params)


def selected(params: Any, rule: Any) -> Any:
    """``params``' tree of bools, True where ``rule`` selects, for ``optax.masked``."""
    chosen = set(plan_of(params, rule).paths)
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in chosen, params)


__all__ = [
    "PackedMasks",
    "SparseState",
    "as_target",
    "check_sharding",
    "check_stages",
    "find_state",
    "masks_of",
    "nm_schedule",
    "param_labels",
    "pattern_at",
    "plan_of",
    "select",
    "selected",
    "sparse",
    "stage_at",
]
