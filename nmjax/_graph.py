"""A parameter's axes read from the ops that consume it, and those ops run N:M sparse.

A model is traced once, abstractly, to a jaxpr whose inputs include its parameters. Each
parameter is followed through the cheap ops a model applies before using it (dtype casts,
copies, transposes, reshapes, sharding constraints, nested ``jit`` calls, ``checkpoint``,
and ``scan``, which slices stacked layers) to the ops that consume it:

* ``dot_general``: its dimension numbers say which of the parameter's axes are contracted
  (the forward N:M groups), which are outputs (the input-gradient groups) and which are
  batch axes;
* ``conv_general_dilated``: its kernel spec says which axes are the window, ``I`` and ``O``;
* anything else (an embedding ``gather``, a bias ``add``, a norm ``mul``) is a use a sparse
  product cannot take.

:func:`analyse` returns every use of every parameter; :class:`Rewriter` evaluates the same
jaxpr with the selected parameters' products replaced by :func:`nmjax.ops.nm_dense` /
:func:`nmjax.ops.nm_conv`, carrying each parameter's masks through the same cheap ops as the
parameter itself, so the masks reach each product in that product's own view of the weight.

Axis bookkeeping: every axis of a value derived from a parameter is a tuple of *pieces*
``(leaf axis, stride, size)`` (major to minor): a transpose permutes them, a reshape merges
or splits them, a scan slices the leading one off. A product needs each leaf axis wholly on
one side (contracted, output, or batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

Piece = tuple[int, int, int]          # (leaf axis, stride, size); axis -1: a size-1 filler
Dims = tuple[tuple[Piece, ...], ...]  # per axis of a value: its pieces, major to minor

# Ops that keep every axis where it is.
_SAME = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint",
                   "reduce_precision", "device_put", "pvary", "mesh_cast", "reshard"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"checkpoint", "remat", "remat2"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                     "custom_lin"})


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a kernel's axes go in its product (all tuples of the kernel's own axes).

    Attributes:
      shape: the kernel's shape.
      stack: axes that index separate matrices: layers stacked for ``scan`` and
        ``dot_general`` batch axes (e.g. experts), in order.
      contract: the contracted axes, flattened in this order (the last is innermost): the
        forward N:M groups run along the flattened contraction.
      out: the output axes, flattened in this order: the input-gradient groups (and a
        Bi-Mask permutation) run along them.

    The kernel's *canonical view* is ``(S, K, N)``: ``transpose(stack + contract + out)``
    reshaped, with ``S``, ``K``, ``N`` the products of those axes' sizes. Every pattern is
    applied to each ``(K, N)`` matrix with ``axis=0``, as to a Dense ``(in, out)`` kernel.
    """

    shape: tuple[int, ...]
    stack: tuple[int, ...]
    contract: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def order(self) -> tuple[int, ...]:
        return self.stack + self.contract + self.out

    @property
    def sizes(self) -> tuple[int, int, int]:
        size = lambda axes: math.prod(self.shape[a] for a in axes)
        return size(self.stack), size(self.contract), size(self.out)

    def to_canonical(self, x: jax.Array) -> jax.Array:
        """``x`` of :attr:`shape` as ``(S, K, N)``."""
        return jnp.transpose(x, self.order).reshape(self.sizes)

    def from_canonical(self, x: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_canonical`."""
        shape = tuple(self.shape[a] for a in self.order)
        inverse = tuple(self.order.index(a) for a in range(len(self.shape)))
        return jnp.transpose(jnp.reshape(x, shape), inverse)

    @property
    def perm_shape(self) -> tuple[int, ...]:
        """Shape of a Bi-Mask permutation for this kernel: one ``(N,)`` per stacked matrix."""
        return (*(self.shape[a] for a in self.stack), self.sizes[2])

    def describe(self) -> str:
        """``"contract (1,) -> out (0,)"`` (with ``stack`` when there is one)."""
        text = f"contract {self.contract} -> out {self.out}"
        return f"stack {self.stack}, {text}" if self.stack else text


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumer of a parameter: a product (``layout`` set) or another op (``reason``)."""

    op: str
    layout: Layout | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class _Track:
    leaf: int
    dims: Dims
    scanned: tuple[Piece, ...] = ()


def leaf_dims(shape: Sequence[int]) -> Dims:
    return tuple(((a, 1, int(n)),) for a, n in enumerate(shape))


def _solid(dims: Dims) -> list[Piece]:
    return [p for d in dims for p in d if p[2] != 1]


def reshape_dims(dims: Dims, new_shape: Sequence[int]) -> Dims | None:
    """The pieces of a reshape's result, or ``None`` where it mixes pieces it cannot split."""
    seq = _solid(dims)
    out = []
    for size in new_shape:
        cur: list[Piece] = []
        need = int(size)
        while need > 1:
            if not seq:
                return None
            axis, stride, n = seq[0]
            if n <= need:
                if need % n:
                    return None
                cur.append(seq.pop(0))
                need //= n
            else:
                if n % need:
                    return None
                rest = n // need
                cur.append((axis, stride * rest, need))
                seq[0] = (axis, stride, rest)
                need = 1
        out.append(tuple(cur) if cur else ((-1, 1, 1),))
    return None if seq else tuple(out)


def structural_dims(eqn: Any, dims: Dims) -> tuple[Dims | None, str | None]:
    """``(pieces of the output, None)`` for an op that only moves axes, else
    ``(None, reason)``."""
    name, params = eqn.primitive.name, eqn.params
    if name in _SAME:
        return dims, None
    if name == "transpose":
        return tuple(dims[p] for p in params["permutation"]), None
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None, "a reshape with dimensions="
        new = reshape_dims(dims, eqn.outvars[0].aval.shape)
        return (new, None) if new is not None else (None, "a reshape that mixes its axes")
    if name == "squeeze":
        return tuple(d for i, d in enumerate(dims) if i not in params["dimensions"]), None
    if name == "expand_dims":
        new = list(dims)
        for i in sorted(params["dimensions"]):
            new.insert(i, ((-1, 1, 1),))
        return tuple(new), None
    if name == "broadcast_in_dim":
        shape, where = params["shape"], params["broadcast_dimensions"]
        in_shape = eqn.invars[0].aval.shape
        if any(in_shape[i] != shape[j] for i, j in enumerate(where)):
            return None, "a broadcast of the parameter"
        new = [((-1, 1, 1),)] * len(shape)
        for i, j in enumerate(where):
            new[j] = dims[i]
        if any(shape[j] != 1 for j in range(len(shape)) if j not in where):
            return None, "a broadcast of the parameter"
        return tuple(new), None
    return None, None


def _axes(pieces: Sequence[Piece]) -> list[int]:
    seen: list[int] = []
    for axis, _, size in pieces:
        if axis >= 0 and size != 1 and axis not in seen:
            seen.append(axis)
    return seen


def _layout(shape: tuple[int, ...], stack: list[int], contract: list[int], out: list[int],
            ) -> Layout | str:
    groups = (stack, contract, out)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            both = set(a) & set(b)
            if both:
                return (f"axis {min(both)} is split between the contracted, output and batch "
                        "axes of the product")
    placed = set(stack) | set(contract) | set(out)
    ones = [a for a in range(len(shape)) if a not in placed]
    if any(shape[a] != 1 for a in ones):
        return "the product does not use all of the parameter's axes"
    if not contract:
        return "the product contracts none of its axes"
    if not out:
        return "a vector: the product has no output axis"
    # Size-1 axes no product uses go last in the stack: they index nothing.
    return Layout(shape, tuple(stack) + tuple(ones), tuple(contract), tuple(out))


def dot_layout(eqn: Any, side: int, track: _Track, shape: tuple[int, ...]) -> Layout | str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, wb = (rc, rb) if side == 1 else (lc, lb)
    ndim = len(track.dims)
    wf = [d for d in range(ndim) if d not in wc and d not in wb]
    stack = _axes(track.scanned) + _axes([p for d in wb for p in track.dims[d]])
    contract = sorted(_axes([p for d in wc for p in track.dims[d]]))
    out = sorted(_axes([p for d in wf for p in track.dims[d]]))
    return _layout(shape, stack, contract, out)


def conv_layout(eqn: Any, track: _Track, shape: tuple[int, ...]) -> Layout | str:
    params = eqn.params
    if params.get("batch_group_count", 1) != 1:
        return "a convolution with batch_group_count > 1"
    rhs_spec = params["dimension_numbers"].rhs_spec
    whole = []
    for d in rhs_spec:
        pieces = [p for p in track.dims[d] if p[2] != 1 or p[0] >= 0]
        if len(pieces) != 1 or pieces[0][1] != 1 or pieces[0][2] != shape[pieces[0][0]]:
            return "a convolution whose kernel axes are not the parameter's own axes"
        whole.append(pieces[0][0])
    o, i, *spatial = whole
    return _layout(shape, _axes(track.scanned), [*spatial, i], [o])


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]]:
    """``(open jaxpr, its consts)`` of a call-like equation."""
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _scan_parts(eqn: Any) -> tuple[int, int, Any, list[Any]]:
    """``(number of consts, number of carries, body jaxpr, body consts)`` of a scan."""
    params = eqn.params
    body = params["jaxpr"]
    body, consts = (body.jaxpr, list(body.consts)) if isinstance(body, jcore.ClosedJaxpr) \
        else (body, [])
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"], body, consts
    c, k, _ = params["ft_in"].update(list(range(len(eqn.invars)))).unpack()
    return len(list(c)), len(list(k)), body, consts


def _is_var(v: Any) -> bool:
    return not isinstance(v, jcore.Literal)


class Analysis:
    """Every use of every parameter in a jaxpr: ``uses[leaf] -> [Use, ...]``."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = [tuple(s) for s in shapes]
        self.uses: dict[int, list[Use]] = {i: [] for i in range(len(shapes))}

    def other(self, track: _Track, op: str, reason: str | None = None) -> None:
        self.uses[track.leaf].append(Use(op, None, reason or f"used by {op}"))

    def run(self, jaxpr: Any, env: dict[Any, _Track]) -> list[_Track | None]:
        for eqn in jaxpr.eqns:
            tracks = [env.get(v) if _is_var(v) else None for v in eqn.invars]
            if any(t is not None for t in tracks):
                self.eqn(eqn, tracks, env)
        return [env.get(v) if _is_var(v) else None for v in jaxpr.outvars]

    def eqn(self, eqn: Any, tracks: list[_Track | None], env: dict[Any, _Track]) -> None:
        name = eqn.primitive.name
        live = [(i, t) for i, t in enumerate(tracks) if t is not None]
        if name == "dot_general":
            if len(live) > 1:
                for _, t in live:
                    self.other(t, name, "a product of two parameters")
                return
            side, t = live[0]
            found = dot_layout(eqn, side, t, self.shapes[t.leaf])
            self.uses[t.leaf].append(Use(name, *((found, None) if isinstance(found, Layout)
                                                   else (None, found))))
            return
        if name == "conv_general_dilated":
            for side, t in live:
                found = "the input of a convolution" if side == 0 else conv_layout(
                    eqn, t, self.shapes[t.leaf])
                self.uses[t.leaf].append(Use(name, *((found, None) if isinstance(found, Layout)
                                                       else (None, found))))
            return
        if name in _CALLS or name in _REMAT:
            sub, _ = _sub_jaxpr(eqn)  # a closed jaxpr's consts are constvars, not invars
            inner = {v: t for v, t in zip(sub.invars, tracks, strict=True) if t is not None}
            outs = self.run(sub, inner)
            for v, t in zip(eqn.outvars, outs, strict=True):
                if t is not None:
                    env[v] = t
            return
        if name == "scan":
            self.scan(eqn, tracks)
            return
        if name in _CUSTOM:
            for _, t in live:
                self.other(t, name, f"passed into a {name} function (its own derivative rule)")
            return
        if len(live) == 1 and live[0][0] == 0 and len(eqn.outvars) == 1:
            t = live[0][1]
            dims, reason = structural_dims(eqn, t.dims)
            if dims is not None:
                env[eqn.outvars[0]] = dataclasses.replace(t, dims=dims)
                return
            if reason is not None:
                self.other(t, name, reason)
                return
        for _, t in live:
            self.other(t, name, _describe(name))

    def scan(self, eqn: Any, tracks: list[_Track | None]) -> None:
        n_consts, n_carry, body, _ = _scan_parts(eqn)
        inner: dict[Any, _Track] = {}
        for i, (v, t) in enumerate(zip(body.invars, tracks, strict=True)):
            if t is None:
                continue
            if i < n_consts:
                inner[v] = t
            elif i < n_consts + n_carry:
                self.other(t, "scan", "carried through a scan loop")
            else:
                lead = [p for p in t.dims[0] if p[2] != 1]
                inner[v] = _Track(t.leaf, t.dims[1:], t.scanned + tuple(lead))
        self.run(body, inner)


def _describe(name: str) -> str:
    return {"gather": "gather (an embedding lookup)", "add": "add (e.g. a bias)",
            "mul": "mul (e.g. a norm scale or a mask)",
            "dynamic_slice": "dynamic_slice"}.get(name, name)


def analyse(closed: Any, leaves: Sequence[int]) -> dict[int, list[Use]]:
    """Uses of the jaxpr inputs ``leaves`` (indices into ``closed.jaxpr.invars``), keyed by
    their position in ``leaves``."""
    jaxpr = closed.jaxpr
    shapes = [tuple(jaxpr.invars[i].aval.shape) for i in leaves]
    analysis = Analysis(shapes)
    env = {jaxpr.invars[i]: _Track(k, leaf_dims(shapes[k])) for k, i in enumerate(leaves)}
    analysis.run(jaxpr, env)
    return analysis.uses


# ------------------------------------------------------------------------------- rewrite


@dataclasses.dataclass(frozen=True)
class Live:
    """A selected parameter's value in some op's view: its pieces and its masks there."""

    leaf: int
    dims: Dims
    fwd: jax.Array
    bwd: jax.Array | None
    perm: jax.Array | None
    perm_stack: tuple[int, ...] = ()


# (leaf index, x, w, live, eqn) -> output for dot_general; same signature for conv.
Product = Callable[..., jax.Array]


def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: list[Any] = []
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _bind_like(eqn: Any, x: jax.Array | None) -> jax.Array | None:
    """The same axis-moving op on a mask (dtype casts and copies leave it as it is)."""
    name = eqn.primitive.name
    if x is None or name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        return x
    params = dict(eqn.params)
    if name == "broadcast_in_dim":
        return lax.broadcast_in_dim(x, params["shape"], params["broadcast_dimensions"])
    return _bind(eqn, [x])[0]


class Rewriter:
    """Evaluates a jaxpr with the products of the selected parameters replaced.

    ``product(eqn, x, w, live, side)`` computes a ``dot_general`` or
    ``conv_general_dilated`` equation whose operand ``side`` is a selected parameter. It
    may append ``(key, array)`` to :attr:`records` (``key`` static): arrays recorded inside
    a ``scan`` come out stacked along a new leading axis, those inside ``checkpoint`` as
    its outputs.
    """

    def __init__(self, product: Product):
        self.product = product
        self.records: list[tuple[Any, jax.Array]] = []

    def _traced(self, fn: Callable, keys: list[Any]) -> Callable:
        """``fn`` returning ``(its outputs, the arrays it recorded)``; their keys go to
        ``keys`` when it is traced."""

        def wrapped(*a):
            mark = len(self.records)
            outs = fn(*a)
            new = self.records[mark:]
            del self.records[mark:]
            keys[:] = [k for k, _ in new]
            return outs, [x for _, x in new]

        return wrapped

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
            lives: dict[Any, Live]) -> list[Any]:
        env: dict[Any, Any] = {}
        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            found = [(i, lives[v]) for i, v in enumerate(eqn.invars)
                     if _is_var(v) and v in lives]
            outs = self.eqn(eqn, invals, found, lives) if found else _bind(eqn, invals)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, invals: list[Any], found: list[tuple[int, Live]],
            lives: dict[Any, Live]) -> list[Any]:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            (side, live), = found
            x = invals[1 - side]
            return [self.product(eqn, x, invals[side], live, side)]
        if name in _CALLS:
            sub, consts = _sub_jaxpr(eqn)
            inner = {sub.invars[i]: live for i, live in found}
            return self.run(sub, consts, invals, inner)
        if name in _REMAT:
            return self.remat(eqn, invals, found)
        if name == "scan":
            return self.scan(eqn, invals, found)
        (_, live), = found
        dims, _ = structural_dims(eqn, live.dims)
        if dims is None:  # the analysis refused this leaf; it cannot be selected
            raise AssertionError(f"unexpected use of a selected parameter by {name}")
        out = _bind(eqn, invals)
        lives[eqn.outvars[0]] = dataclasses.replace(
            live, dims=dims, fwd=_bind_like(eqn, live.fwd), bwd=_bind_like(eqn, live.bwd))
        return out

    def remat(self, eqn: Any, invals: list[Any], found: list[tuple[int, Live]]) -> list[Any]:
        sub, consts = _sub_jaxpr(eqn)
        masks = [(live.fwd, live.bwd, live.perm) for _, live in found]

        def body(invals, masks):
            inner = {sub.invars[i]: dataclasses.replace(live, fwd=m[0], bwd=m[1], perm=m[2])
                     for (i, live), m in zip(found, masks, strict=True)}
            return self.run(sub, consts, invals, inner)

        policy = eqn.params.get("policy")
        keys: list[Any] = []
        outs, side = jax.checkpoint(self._traced(body, keys),
                                    prevent_cse=eqn.params.get("prevent_cse", True),
                                    policy=policy)(invals, masks)
        self.records += zip(keys, side, strict=True)
        return outs

    def scan(self, eqn: Any, invals: list[Any], found: list[tuple[int, Live]]) -> list[Any]:
        params = eqn.params
        n_consts, n_carry, body, body_consts = _scan_parts(eqn)
        consts, init, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                            invals[n_consts + n_carry:])
        const_lives = {body.invars[i]: live for i, live in found if i < n_consts}
        sliced = [(i, live) for i, live in found if i >= n_consts + n_carry]
        mask_xs = []
        for _, live in sliced:
            lead = _axes([p for p in live.dims[0] if p[2] != 1])
            perm = live.perm
            if perm is not None:
                if not live.perm_stack or live.perm_stack[0] != lead[0]:
                    raise ValueError("a scan slices a Bi-Mask kernel along an axis its "
                                     "permutation is not stacked along")
            mask_xs.append((_pack_bits(live.fwd), _pack_bits(live.bwd), perm))

        def step(carry, x):
            x_vals, masks = x
            inner = dict(const_lives)
            for (i, live), m in zip(sliced, masks, strict=True):
                inner[body.invars[i]] = Live(
                    live.leaf, live.dims[1:], _unpack_bits(m[0], live.fwd),
                    _unpack_bits(m[1], live.bwd), m[2],
                    live.perm_stack[1:] if live.perm is not None else ())
            outs = self.run(body, body_consts, [*consts, *carry, *x_vals], inner)
            return outs[:n_carry], outs[n_carry:]

        keys: list[Any] = []
        traced = self._traced(step, keys)

        def scan_step(carry, x):
            (carry, ys), side = traced(carry, x)
            return carry, (ys, side)

        carry, (ys, side) = lax.scan(scan_step, list(init), (list(xs), mask_xs),
                                     length=params["length"], reverse=params["reverse"],
                                     unroll=params["unroll"])
        self.records += zip(keys, side, strict=True)
        return [*carry, *ys]


# A scan over stacked layers takes their masks packed 8 per byte and unpacks each layer's
# inside the body: the masks of all layers are then never held unpacked at once (on a
# 22-layer 1.1B model, 1 byte per weight for the whole forward pass).


def _bits_axis(shape: Sequence[int]) -> int | None:
    """The innermost axis past the scanned one whose length is a multiple of 8."""
    return next((a for a in reversed(range(1, len(shape))) if shape[a] % 8 == 0), None)


def _pack_bits(mask: jax.Array | None) -> jax.Array | None:
    """A stacked bool mask with 8 entries of :func:`_bits_axis` per ``uint8`` (as it is
    when no axis fits, or when it is not bool)."""
    from nmjax._packed_masks import pack_bits

    axis = None if mask is None or mask.dtype != jnp.bool_ else _bits_axis(mask.shape)
    return mask if axis is None else pack_bits(mask, axis)


def _unpack_bits(bits: jax.Array | None, like: jax.Array | None) -> jax.Array | None:
    """One layer's slice of :func:`_pack_bits`'s result as the bool mask of ``like``'s
    slice."""
    from nmjax._packed_masks import unpack_bits

    if bits is None or like is None or bits.dtype == like.dtype:
        return bits
    return unpack_bits(bits, like.shape[1:], _bits_axis(like.shape) - 1)


def split_pieces(dims: Dims, shape: Sequence[int]) -> list[list[Piece]]:
    """Each axis's pieces, with a size-1 filler for an axis that has none."""
    out = []
    for d, n in zip(dims, shape, strict=True):
        pieces = [p for p in d if p[2] != 1]
        if math.prod(p[2] for p in pieces) != n:
            raise AssertionError(f"pieces {d} do not make an axis of size {n}")
        out.append(pieces or [(-1, 1, 1)])
    return out


# ------------------------------------------------------------------------- the products


def _prod(sizes: Sequence[int]) -> int:
    return math.prod(int(s) for s in sizes)


def _activation_matrix(x: jax.Array, pieces: list[list[Piece]], paired: dict[int, int],
                       b_items: list, c_items: list, xf: list[int], batch: int, depth: int
                       ) -> jax.Array:
    """The other operand as ``(batch, rows, K)``: each of its axes paired with a kernel axis
    split into that axis's pieces, then laid out in the kernel's canonical order."""
    x_split, x_start, pos = [], {}, 0
    w_of_x = {xd: wd for wd, xd in paired.items()}
    for d in range(x.ndim):
        sizes = [p[2] for p in pieces[w_of_x[d]]] if d in w_of_x else [x.shape[d]]
        x_start[d] = pos
        pos += len(sizes)
        x_split += sizes
    x_order = ([x_start[paired[d]] + k for d, k in b_items] + [x_start[d] for d in xf]
               + [x_start[paired[d]] + k for d, k in c_items])
    rows = _prod(x.shape[d] for d in xf)
    return jnp.transpose(x.reshape(x_split), x_order).reshape(batch, rows, depth)


@dataclasses.dataclass(frozen=True)
class DotView:
    """A ``dot_general`` whose operand ``side`` is a selected kernel, seen on the kernel's
    canonical ``(batch, K, N)`` view: the kernel's pieces and which of them go where."""

    pieces: list[list[Piece]]
    b_items: list[tuple[int, int]]
    c_items: list[tuple[int, int]]
    o_items: list[tuple[int, int]]
    natural_out: list[tuple[int, int]]
    wb: list[int]
    wf: list[int]
    xf: list[int]
    paired: dict[int, int]
    batch: int
    depth: int
    width: int

    def matrix(self, a: jax.Array) -> jax.Array:
        """A kernel-shaped array as ``(batch, K, N)``."""
        start = [sum(len(p) for p in self.pieces[:d]) for d in range(len(self.pieces))]
        order = [start[d] + k for d, k in self.b_items + self.c_items + self.o_items]
        split = [p[2] for ps in self.pieces for p in ps]
        return jnp.transpose(a.reshape(split), order).reshape(self.batch, self.depth,
                                                               self.width)

    def activation(self, x: jax.Array) -> jax.Array:
        """The other operand as ``(batch, rows, K)`` (rows: its free axes, in order)."""
        return _activation_matrix(x, self.pieces, self.paired, self.b_items, self.c_items,
                                  self.xf, self.batch, self.depth)


def dot_view(eqn: Any, x_ndim: int, w_shape: Sequence[int], dims: Dims, side: int,
             layout: Layout) -> DotView:
    """The :class:`DotView` of a ``dot_general`` equation whose operand ``side`` is a kernel
    of ``w_shape`` with pieces ``dims`` (contracted and output pieces in ``layout``'s order)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc, xb, wb = (lc, rc, lb, rb) if side == 1 else (rc, lc, rb, lb)
    ndim = len(w_shape)
    wf = [d for d in range(ndim) if d not in wc and d not in wb]
    xf = [d for d in range(x_ndim) if d not in xc and d not in xb]
    pieces = split_pieces(dims, w_shape)

    def rank(axes: tuple[int, ...]):
        return lambda item: ((axes.index(pieces[item[0]][item[1]][0])
                              if pieces[item[0]][item[1]][0] >= 0 else -1),
                             -pieces[item[0]][item[1]][1])

    b_items = [(d, k) for d in wb for k in range(len(pieces[d]))]
    c_items = sorted(((d, k) for d in wc for k in range(len(pieces[d]))),
                     key=rank(layout.contract))
    natural_out = [(d, k) for d in wf for k in range(len(pieces[d]))]
    o_items = sorted(natural_out, key=rank(layout.out))
    size = lambda items: _prod(pieces[d][k][2] for d, k in items)  # noqa: E731
    paired = dict(zip(wc, xc, strict=True)) | dict(zip(wb, xb, strict=True))
    return DotView(pieces, b_items, c_items, o_items, natural_out, list(wb), wf, xf, paired,
                   size(b_items), size(c_items), size(o_items))


def sparse_dot_general(eqn: Any, x: jax.Array, w: jax.Array, live: Live, side: int,
                       layout: Layout, dense: Callable[..., jax.Array]) -> jax.Array:
    """A ``dot_general`` equation whose operand ``side`` is the selected kernel ``w``, run
    as ``dense(x2d, w2d, fwd2d, bwd2d, perm)`` on the kernel's canonical ``(K, N)`` view
    (vmapped over ``dot_general`` batch axes), and put back in the equation's output order.
    """
    v = dot_view(eqn, x.ndim, w.shape, live.dims, side, layout)
    w3, fwd3 = v.matrix(w), v.matrix(live.fwd)
    bwd3 = None if live.bwd is None else v.matrix(live.bwd)
    x3 = v.activation(x)
    perm = None if live.perm is None else live.perm.reshape(v.batch, v.width)

    if v.b_items:
        y = jax.vmap(dense)(x3, w3, fwd3, bwd3, perm)
    else:
        y = dense(x3[0], w3[0], fwd3[0], None if bwd3 is None else bwd3[0],
                  None if perm is None else perm[0])[None]
    pieces, xf, wb, wf = v.pieces, v.xf, v.wb, v.wf
    nb, nf = len(v.b_items), len(xf)
    y = y.reshape([pieces[d][k][2] for d, k in v.b_items] + [x.shape[d] for d in xf]
                  + [pieces[d][k][2] for d, k in v.o_items])
    y = jnp.transpose(y, [*range(nb + nf),
                          *(nb + nf + v.o_items.index(i) for i in v.natural_out)])
    y = y.reshape([w.shape[d] for d in wb] + [x.shape[d] for d in xf] + [w.shape[d] for d in wf])
    if side == 0:  # dot_general's output: batch, lhs free (the kernel's), rhs free
        nbd = len(wb)
        y = jnp.transpose(y, [*range(nbd), *range(nbd + nf, nbd + nf + len(wf)),
                              *range(nbd, nbd + nf)])
    return y.astype(eqn.outvars[0].aval.dtype)


def conv_view(eqn: Any, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """A ``conv_general_dilated``'s input as ``(N, *spatial, C)`` and the order of the
    kernel's axes as ``(*window, I, O)``."""
    dn = eqn.params["dimension_numbers"]
    lhs, rhs = dn.lhs_spec, dn.rhs_spec
    return jnp.transpose(x, (lhs[0], *lhs[2:], lhs[1])), (*rhs[2:], rhs[1], rhs[0])


def sparse_conv(eqn: Any, x: jax.Array, w: jax.Array, live: Live,
                conv: Callable[..., jax.Array]) -> jax.Array:
    """A ``conv_general_dilated`` equation on the selected kernel ``w``, run as
    ``conv(x_nhwc, w_hwio, fwd, bwd, perm, **conv options)`` and put back in the
    equation's layout."""
    params = eqn.params
    out = params["dimension_numbers"].out_spec
    x_nhwc, w_order = conv_view(eqn, x)
    hwio = lambda a: None if a is None else jnp.transpose(a, w_order)  # noqa: E731
    y = conv(x_nhwc, hwio(w), hwio(live.fwd),
             hwio(live.bwd), live.perm, strides=params["window_strides"],
             padding=params["padding"], lhs_dilation=params["lhs_dilation"],
             rhs_dilation=params["rhs_dilation"],
             feature_group_count=params["feature_group_count"],
             precision=params["precision"])
    source = [0] * y.ndim
    source[out[0]], source[out[1]] = 0, y.ndim - 1
    for i, d in enumerate(out[2:]):
        source[d] = 1 + i
    return jnp.transpose(y, source).astype(eqn.outvars[0].aval.dtype)
