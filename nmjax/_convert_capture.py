"""What AdaPrune needs from a model: its layers in forward order, and each layer's inputs.

Linen: the model runs under ``nn.intercept_methods``, which sees every module call with
the module itself, so the path, type, settings and inputs of each ``nn.Dense``/``nn.Conv``
call are read where they happen, whatever the model's structure, without changing it.

NNX has no forward hooks. Inside the traced function (never on the caller's model) the
model is rebuilt from its state with ``nnx.merge`` and every ``nnx.Linear``/``nnx.Conv`` is
swapped, wherever it is referenced (attributes, lists, dicts, tied layers), for a wrapper
that records its inputs and calls the layer. This reads the same calls a forward hook would
and leaves the caller's model untouched; patching the layer classes' ``__call__`` would also
work but changes global state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.linen.linear import canonicalize_padding

from nmjax._convert_solve import Geometry
from nmjax.nn.nnx import _children

Record = Callable[[str, Any, jax.Array], None]


@dataclasses.dataclass
class Layer:
    """One kernel-holding layer as the forward pass met it."""

    path: str                  # the kernel's path in the parameter tree
    kind: str | None           # "dense", "conv", or None (another layer type)
    geometry: Geometry | None  # None: AdaPrune cannot take it (``unsupported`` says why)
    unsupported: str | None = None
    input_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


def _tuple(x: Any, nd: int, name: str) -> tuple[int, ...]:
    x = 1 if x is None else x
    return (int(x),) * nd if isinstance(x, int) else tuple(int(v) for v in x)


def conv_geometry(kernel_shape: tuple[int, ...], strides: Any, padding: Any,
                  input_dilation: Any, kernel_dilation: Any) -> Geometry:
    """A Flax conv's settings, canonical, with the padding modes ``lax`` lacks turned into
    an explicit ``jnp.pad`` (as Flax itself does)."""
    nd = len(kernel_shape) - 2
    strides = _tuple(strides, nd, "strides")
    input_dilation = _tuple(input_dilation, nd, "input_dilation")
    kernel_dilation = _tuple(kernel_dilation, nd, "kernel_dilation")
    pad = canonicalize_padding(padding, nd)
    pre_pad = None
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * r + 1 for k, r in zip(kernel_shape[:nd], kernel_dilation,
                                                    strict=True)]
        pre_pad = ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad],
                   tuple(((k - 1) // 2, k // 2) for k in dilated))
        pad = "VALID"
    elif pad == "CAUSAL":
        if nd != 1:
            raise ValueError("CAUSAL padding is only defined for 1-D convolutions")
        pre_pad = ("constant", ((kernel_dilation[0] * (kernel_shape[0] - 1), 0),))
        pad = "VALID"
    elif not isinstance(pad, str):
        pad = tuple(tuple(int(v) for v in p) for p in pad)
    return Geometry("conv", tuple(kernel_shape), strides, pad, input_dilation,
                    kernel_dilation, pre_pad)


def _conv_unsupported(groups: int, mask: Any, custom: bool) -> str | None:
    if groups != 1:
        return (f"a grouped convolution (feature_group_count={groups}); AdaPrune handles "
                "feature_group_count=1")
    if mask is not None:
        return "a conv with a kernel mask (mask=...)"
    if custom:
        return "a layer with a custom conv_general_dilated"
    return None


# ------------------------------------------------------------------------------- Linen


def _linen_path(mdl: nn.Module) -> str:
    return "/".join([*(str(p) for p in mdl.scope.path), "kernel"])


def _linen_layer(mdl: nn.Module, inputs: jax.Array) -> Layer:
    path = _linen_path(mdl)
    if type(mdl) is nn.Dense:
        unsupported = None
        if mdl.dot_general is not None or mdl.dot_general_cls is not None:
            unsupported = "a layer with a custom dot_general"
        return Layer(path, "dense", Geometry("dense", (inputs.shape[-1], mdl.features)),
                     unsupported)
    ks = tuple(mdl.kernel_size) if not isinstance(mdl.kernel_size, int) else (mdl.kernel_size,)
    shape = (*ks, inputs.shape[-1] // mdl.feature_group_count, mdl.features)
    custom = mdl.conv_general_dilated is not None or mdl.conv_general_dilated_cls is not None
    unsupported = _conv_unsupported(mdl.feature_group_count, mdl.mask, custom)
    geometry = conv_geometry(shape, mdl.strides, mdl.padding, mdl.input_dilation,
                             mdl.kernel_dilation) if unsupported is None else None
    return Layer(path, "conv", geometry, unsupported)


class LinenModel:
    """``(apply_fn or Module, params)``; runs ``apply_fn({"params": params, **collections},
    *args, **call_kwargs)``."""

    kind = "linen"

    def __init__(self, fn: Any, params: Any, collections: Mapping[str, Any],
                 call_kwargs: Mapping[str, Any]):
        if isinstance(fn, nn.Module):
            self.module = fn
        elif callable(fn):
            # module.apply (a TrainState's apply_fn) still names its module
            owner = getattr(fn, "__self__", None)
            named_apply = getattr(fn, "__name__", None) == "apply"
            self.module = owner if isinstance(owner, nn.Module) and named_apply else None
        else:
            raise TypeError(f"model must be an NNX module or a pair (apply_fn or Linen module, "
                            f"params), got a pair whose first item is {type(fn).__name__}")
        if not isinstance(params, Mapping):
            raise TypeError(f"the params of a Linen model must be a mapping (the 'params' "
                            f"collection), got {type(params).__name__}")
        if "params" in collections:
            raise ValueError("collections must not hold 'params': pass them as the pair's "
                             "second item")
        self.params = params
        self.extra = dict(collections)
        # What the forward pass is, apart from arrays: the key of its compiled capture.
        self.static = (fn, tuple(sorted(call_kwargs.items())))

    def run(self, params: Any, args: tuple[Any, ...], record: Record,
            layers: dict[str, Layer] | None = None) -> Any:
        return run_linen(self.static, params, self.extra, args, record, layers)


def run_linen(static: Any, params: Any, collections: Any, args: tuple[Any, ...],
              record: Record, layers: dict[str, Layer] | None = None) -> Any:
    """Runs a Linen model; ``record(path, layer_or_None, inputs)`` sees every Dense/Conv
    call; ``layers`` (when given) collects every kernel-holding layer met."""
    fn, call_kwargs = static
    apply = fn.apply if isinstance(fn, nn.Module) else fn

    def intercept(next_fun, a, k, context):
        mdl = context.module
        if context.method_name != "__call__":
            return next_fun(*a, **k)
        if type(mdl) in (nn.Dense, nn.Conv):
            inputs = a[0] if a else k["inputs"]
            layer = _linen_layer(mdl, inputs) if layers is not None else None
            if layer is not None:
                layers.setdefault(layer.path, layer)
            record(_linen_path(mdl), layer, inputs)
            return next_fun(*a, **k)
        out = next_fun(*a, **k)
        if layers is not None and mdl.has_variable("params", "kernel"):
            path = _linen_path(mdl)
            layers.setdefault(path, Layer(path, None, None, f"a {type(mdl).__name__} layer"))
        return out

    with nn.intercept_methods(intercept):
        return apply({"params": params, **collections}, *args, **dict(call_kwargs))


# --------------------------------------------------------------------------------- NNX

_NNX_KINDS = {nnx.Linear: "dense", nnx.Conv: "conv"}


class _Capture(nnx.Module):
    """Stands in for a layer inside a traced call: reports its inputs, then calls it."""

    def __init__(self, layer: nnx.Module, path: str, sink: Any):
        self.layer = layer
        self.path = path
        self.sink = sink

    def __call__(self, *args, **kwargs):
        self.sink(self.path, self.layer, args[0] if args else kwargs["inputs"])
        return self.layer(*args, **kwargs)


def _nnx_layer(path: str, node: nnx.Module) -> Layer:
    kind = _NNX_KINDS.get(type(node))
    if kind is None:
        return Layer(path, None, None, f"a {type(node).__name__} layer")
    shape = tuple(node.kernel.get_value().shape)
    if kind == "dense":
        unsupported = None
        if node.dot_general is not jax.lax.dot_general:
            unsupported = "a layer with a custom dot_general"
        return Layer(path, "dense", Geometry("dense", shape), unsupported)
    custom = node.conv_general_dilated is not jax.lax.conv_general_dilated
    unsupported = _conv_unsupported(node.feature_group_count, node.mask, custom)
    geometry = conv_geometry(shape, node.strides, node.padding, node.input_dilation,
                             node.kernel_dilation) if unsupported is None else None
    return Layer(path, "conv", geometry, unsupported)


def nnx_layers(model: nnx.Module) -> dict[str, tuple[Layer, nnx.Module]]:
    """Every kernel-holding module of ``model`` by kernel path (first path of a tied one)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "kernel", None), nnx.Param):
            kpath = "/".join(str(p) for p in (*path, "kernel"))
            out[kpath] = (_nnx_layer(kpath, node), node)
    return out


class NNXModel:
    """An NNX module, run as ``model(*args, **call_kwargs)`` on a copy rebuilt from its state."""

    kind = "nnx"

    def __init__(self, model: nnx.Module, call_kwargs: Mapping[str, Any]):
        graphdef, self.params, self.extra = nnx.split(model, nnx.Param, ...)
        self.static = (graphdef, tuple(sorted(call_kwargs.items())))

    def run(self, params: Any, args: tuple[Any, ...], record: Record,
            layers: dict[str, Layer] | None = None) -> Any:
        return run_nnx(self.static, params, self.extra, args, record, layers)

    def merge(self, params: Any) -> nnx.Module:
        return nnx.merge(self.static[0], params, self.extra, copy=True)


def run_nnx(static: Any, params: Any, rest: Any, args: tuple[Any, ...], record: Record,
            layers: dict[str, Layer] | None = None) -> Any:
    """Runs an NNX model rebuilt from ``static = (graphdef, call_kwargs)`` and its states,
    its Linear/Conv layers wrapped to report their inputs to ``record``."""
    graphdef, call_kwargs = static
    model = nnx.merge(graphdef, params, rest, copy=True)
    found = nnx_layers(model)
    if layers is not None:
        for path, (layer, _) in found.items():
            layers.setdefault(path, layer)
    by_id = {}
    for path, (layer, node) in found.items():
        if layer.kind is not None:
            by_id[id(node)] = _Capture(node, path, lambda p, _, x, layer=layer:
                                       record(p, layer, x))
    containers = [node for _, node in nnx.iter_graph(model)
                  if isinstance(node, nnx.Module | list | dict | nnx.List | nnx.Dict)]
    for parent in containers:
        for key, child in _children(parent):
            wrapper = by_id.get(id(child))
            if wrapper is None:
                continue
            if isinstance(parent, nnx.Module) and isinstance(key, str):
                setattr(parent, key, wrapper)
            else:
                parent[key] = wrapper
    if id(model) in by_id:
        model = by_id[id(model)]
    return model(*args, **dict(call_kwargs))


RUN = {"linen": run_linen, "nnx": run_nnx}
