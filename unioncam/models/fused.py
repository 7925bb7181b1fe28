"""An inference copy of a network: each BatchNorm folded into the convolution before it, activations
after a convolution run in place. The same function up to float rounding, with fewer passes over memory.

For ``y = BN(conv(x))`` in eval mode, with ``s = γ / sqrt(σ² + ε)`` per output channel::

    y = conv(x; W·s, (b − μ)·s + β)

so one convolution with folded weights replaces the convolution and the normalization
(``torch.nn.utils.fusion.fuse_conv_bn_eval``). An activation (ReLU, ReLU6, Hardtanh, SiLU, Hardswish,
LeakyReLU) whose input is a convolution's or normalization's output that nothing else uses then
overwrites that output instead of allocating a new tensor. On EfficientNet-Lite0 on two CPU cores this
made the channels_last eager forward 1.2-1.3× (batch 4) and 1.4-1.5× (batch 32) faster, ResNet-50's 1.03-1.16×
(``benchmarks/bench_forward.py``, docs/performance.md).

The copy is built from a ``torch.fx`` trace of the network (convolutions, linear layers and
normalizations are leaves, so a subclass with its own padding, like EfficientNet's "same" convolution,
is kept whole). Only a trace shows that a convolution's output has one user; a network that cannot be
traced, whose weights are inference tensors, or whose ``forward`` stores values (in an attribute, a list
or dict attribute: a side effect the copy would not repeat) is not fused (:class:`FuseError`). The trace
runs on a copy of the module tree (the tensors shared), so it never changes the network. It is made with
every module in eval mode and fixes the network's Python-level choices (``self.training`` branches,
attributes read in ``forward``). A parametrized weight (``weight_norm``) is not folded, nor are weights
whose own dtype rounds beyond the fold check (bf16 weights; fp32 weights under bf16 autocast fold).

The copy calls the network's own leaf modules, except the folded pairs and the replaced activations;
the folded convolutions hold weights of their own. :meth:`FusedNet.current` tells when the copy no
longer matches the network: another module tree (a module added, removed or replaced), or a tensor it
was built from or captured (the folded pairs' weights and statistics, the tensors the trace reads as
attributes) replaced, updated in place (PyTorch bumps its version: in-place ops, ``load_state_dict``,
``nn.init``) or given new storage (``.to()``). Not seen: writes that PyTorch does not version (through
``.data`` or a NumPy view), and changed settings of a folded or replaced module (a BatchNorm's ``eps``, a
convolution's ``stride``, an activation's slope, a patched ``forward``): call
``PixelModel.fuse_inference()`` again after them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from unioncam.ops import ieee_fp32

# activations (these classes exactly) with an ``inplace`` flag whose in-place form computes the same values
INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.LeakyReLU)
_FRESH = (nn.Conv2d, nn.BatchNorm2d)  # these classes exactly: their output is a new tensor, never a view
FOLD_TOLERANCE = 1e-3  # a folded pair against the pair, on a random input, relative to the output's largest value


class FuseError(RuntimeError):
    """The network cannot be fused (fx cannot trace it, it holds inference tensors, its ``forward`` stores
    values), so it runs as it is."""


class _Tracer(fx.Tracer):
    """Convolutions, linear layers and normalizations stay whole (subclasses included)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm)) or super().is_leaf_module(m, module_qualified_name)


# a tensor the copy was built from or holds: (its owner's ``_parameters``, ``_buffers`` or ``__dict__``,
# its name there, the tensor, its version, its storage address)
Source = tuple[dict[str, Any], str, Tensor | None, int, int]


def _source(owner: nn.Module, name: str) -> Source:
    table = next((t for t in (owner._parameters, owner._buffers) if name in t), owner.__dict__)
    t = table.get(name)
    t = t if isinstance(t, Tensor) else None
    if t is not None and t.is_inference():  # no version counter to follow it by
        raise FuseError(f"{type(owner).__name__}.{name} is an inference tensor (made under torch.inference_mode)")
    return table, name, t, t._version if t is not None else 0, t.data_ptr() if t is not None else 0


# a watched module's child: (the module's table of submodules, the table's size, the child's name, the
# child); a module without children has one entry with name "" and child None
Child = tuple[dict[str, nn.Module | None], int, str, nn.Module | None]


@dataclass(frozen=True, eq=False)
class FusedNet:
    """A fused copy of a network (:func:`fuse`).

    Attributes:
        module: the copy (a ``GraphModule``).
        net: the network it copies.
        pairs: the (convolution, normalization) modules of the network folded into one, in graph order.
        inplace: how many activations run in place.
        watched: the network's modules when it was traced.
        children: the module tree then, one entry per child of each watched module.
        sources: the tensors the copy was built from or captured, as they were then.
    """

    module: fx.GraphModule
    net: nn.Module
    pairs: tuple[tuple[nn.Conv2d, _BatchNorm], ...]
    inplace: int
    watched: tuple[nn.Module, ...]
    children: tuple[Child, ...]
    sources: tuple[Source, ...]

    def current(self, net: nn.Module) -> bool:
        """The copy still copies ``net``: the same network, the same module tree, every source unchanged
        (module docstring). About 0.2 ms for EfficientNet-Lite0 on this project's CPU (one flat pass)."""
        return net is self.net \
            and all(table.get(name) is child and len(table) == size for table, size, name, child in self.children) \
            and all(table.get(name) is t and (t is None or (t._version == version and t.data_ptr() == ptr))
                    for table, name, t, version, ptr in self.sources)

    def usable(self) -> bool:
        """The copy computes what the network would now: :func:`can_fuse` of its modules."""
        return _ready(self.watched)


def _ready(modules: Iterable[nn.Module]) -> bool:
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in modules)


def can_fuse(net: nn.Module) -> bool:
    """A fused copy of ``net`` may be built and run now: every module is in eval mode (the trace fixes
    ``self.training`` branches, and a fold needs the running statistics), and none has a forward hook
    or pre-hook, nor is one registered globally (the copy does not call every module of ``net``: the
    folded pairs, the replaced activations, the containers the trace went through, so a hook there
    would not run)."""
    return _ready(net.modules())


def fuse(net: nn.Module) -> FusedNet:
    """The fused copy of ``net`` (module docstring); ``net`` itself is not changed.

    Raises:
        FuseError: ``torch.fx`` cannot trace ``net`` (data-dependent control flow, say), its weights are
            inference tensors, or its ``forward`` stores values.
    """
    tensors = [*net.parameters(), *net.buffers()]
    if any(t.is_inference() for t in tensors):
        raise FuseError(f"{type(net).__name__}'s weights are inference tensors (made under torch.inference_mode)")
    try:  # the trace runs forward on a copy of the module tree (the tensors shared), never on net itself
        traced = copy.deepcopy(net, {id(t): t for t in tensors})
    except Exception as exc:  # an attribute that cannot be copied (a lock, a file)
        raise FuseError(f"{type(net).__name__} cannot be copied to trace it: {type(exc).__name__}: {exc}"
                        .splitlines()[0]) from exc
    copies = list(traced.modules())
    before = [_attributes(m) for m in copies]
    try:
        with torch.inference_mode(False), torch.no_grad():
            graph = _Tracer().trace(traced)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        raise FuseError(f"torch.fx cannot trace {type(net).__name__}: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from exc
    attrs = {n.target for n in graph.nodes if n.op == "get_attr" and isinstance(n.target, str)}
    constants = {a for a in attrs if "." not in a and a not in before[0]["__dict__"]}  # what fx stowed on the root
    for m, was in zip(copies, before, strict=True):
        now = _attributes(m)
        if m is traced:
            now["__dict__"] = {k: v for k, v in now["__dict__"].items() if k not in constants}
        if not _same(now, was) or _holds_proxy(now["__dict__"]):
            name = next(n for n, c in traced.named_modules() if c is m) or "the network"
            raise FuseError(f"{type(net).__name__}.forward stores values in {name} (a side effect a copy would "
                            "not repeat)")
    root: dict[str, Any] = {}  # what the graph calls and reads: net's own modules and tensors, fx's constants
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(node.target, str):
            root[node.target] = net.get_submodule(node.target)
        elif node.op == "get_attr" and isinstance(node.target, str):
            owner, _, name = node.target.rpartition(".")
            root[node.target] = getattr(traced if node.target in constants else net.get_submodule(owner), name)
    gm = fx.GraphModule(root, graph, class_name=f"Fused{type(net).__name__}")  # it calls the very modules of net
    modules = list(net.modules())
    pairs: list[tuple[nn.Conv2d, _BatchNorm]] = []
    fresh: set[nn.Module] = set()  # the folded convolutions
    inplace = 0

    def called(node: object) -> nn.Module | None:
        """The module a node calls (one of ``net``'s, or one put in the copy here), else None."""
        if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(node.target, str):
            return gm.get_submodule(node.target)
        return None

    with torch.inference_mode(False), torch.no_grad():
        for node in list(gm.graph.nodes):
            module = called(node)
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            producer = called(source)
            if module is None or producer is None or not isinstance(source, fx.Node) or len(source.users) != 1:
                continue  # only a module's output that nothing else uses may be folded or overwritten
            if isinstance(module, nn.BatchNorm2d) and isinstance(producer, nn.Conv2d):
                folded = _fold(producer, module)
                if folded is None:
                    continue
                source.target = _add(gm, f"{source.target}_fused", folded)
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                pairs.append((producer, module))
                fresh.add(folded)
            elif type(module) in INPLACE_ACTIVATIONS and not getattr(module, "inplace", True) \
                    and (type(producer) in _FRESH or producer in fresh):
                twin = copy.deepcopy(module)
                setattr(twin, "inplace", True)  # noqa: B010 - nn.Module types attributes as Tensor | Module
                node.target = _add(gm, f"{node.target}_inplace", twin)
                inplace += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the folded pairs' modules, the replaced activations
    gm.recompile()
    sources = [_source(m, name) for conv, bn in pairs for m, names in
               ((conv, ("weight", "bias")), (bn, ("weight", "bias", "running_mean", "running_var"))) for name in names]
    for target in sorted(attrs - constants):  # tensors the trace reads as attributes: the copy holds them
        owner, _, name = target.rpartition(".")
        sources.append(_source(net.get_submodule(owner), name))
    children: list[Child] = [(m._modules, len(m._modules), name, child) for m in modules
                             for name, child in (m._modules.items() or [("", None)])]
    return FusedNet(gm, net, tuple(pairs), inplace, tuple(modules), tuple(children), tuple(sources))


_TABLES = ("_parameters", "_buffers", "_modules")


def _attributes(m: nn.Module) -> dict[str, dict[str, Any]]:
    """Shallow copies of ``m``'s ``__dict__`` and of its parameter, buffer and module tables: what a
    ``forward`` that sets attributes changes."""
    return {"__dict__": dict(m.__dict__), **{table: dict(getattr(m, table)) for table in _TABLES}}


def _same(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> bool:
    return all(a[k].keys() == b[k].keys() and all(a[k][n] is b[k][n] for n in a[k]) for k in a)


def _holds_proxy(value: object, seen: set[int] | None = None, depth: int = 0) -> bool:
    """An fx ``Proxy`` inside ``value`` (containers and plain objects, 4 levels deep): a value of the
    trace that ``forward`` stored, e.g. appended to a list attribute."""
    if isinstance(value, fx.Proxy):
        return True
    seen = set() if seen is None else seen
    if depth > 4 or id(value) in seen or isinstance(value, (Tensor, nn.Module, str, bytes, int, float, type)):
        return False
    seen.add(id(value))
    if isinstance(value, dict):
        items: Iterable[object] = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif hasattr(value, "__dict__") and not callable(value):
        items = vars(value).values()
    else:
        return False
    return any(_holds_proxy(v, seen, depth + 1) for v in items)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d | None:
    """``conv`` with ``bn`` folded in, or None where that is not ``bn(conv(z))``.

    The fold assumes ``conv`` computes ``W ⊛ x + b`` from its own ``weight`` and ``bias`` and ``bn`` the
    eval-mode affine normalization; a subclass may not (weight standardization, an activation inside the
    normalization), so the folded module is checked against the pair on a random input, in the weights'
    dtype at full precision (a caller's autocast or TF32 would round both sides beyond the tolerance).
    """
    if conv.training or bn.training or bn.running_mean is None or bn.running_var is None \
            or parametrize.is_parametrized(conv) or parametrize.is_parametrized(bn):
        return None  # a parametrized weight (weight_norm, spectral_norm) is computed, not held
    try:
        folded = fuse_conv_bn_eval(conv, bn)
    except Exception:  # a subclass fuse_conv_bn_eval cannot copy or assign to
        return None
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    side = max(8, (max(kh, kw) - 1) * max(dh, dw) + 2)
    z = torch.randn(2, conv.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(
        device=conv.weight.device, dtype=conv.weight.dtype)
    try:
        with ieee_fp32(), torch.autocast(device_type=z.device.type, enabled=False):
            expected, got = bn(conv(z)), folded(z)
    except RuntimeError:
        return None
    if expected.shape != got.shape:
        return None
    scale = float(expected.abs().max()) or 1.0
    return folded if float((expected - got).abs().max()) <= FOLD_TOLERANCE * scale else None


def _add(gm: fx.GraphModule, base: str, module: nn.Module) -> str:
    """Put ``module`` in ``gm`` under a new top-level name made from ``base``; returns the name."""
    stem = base.replace(".", "_")
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}{i}"
    gm.add_submodule(name, module)
    return name
