"""The CAM base class: hooks scoped to a call, one forward (and backward), a fixed pipeline.

``CAM.__call__`` validates the input, puts the model in eval mode, hooks the target layer for the
one explaining forward (the hooks are removed right after it, and in ``finally``: the model carries
no unioncam hook between calls), takes ``g = ∂S_c/∂A`` with ``torch.autograd.grad`` (so parameters
never get ``.grad`` and in-place ReLUs such as VGG16's are harmless), applies the optional token
reshape (transformers, :func:`unioncam.ops.vit_reshape`) to ``A`` and ``g``, asks the subclass for
its raw saliency (:meth:`CAM.compute`), then upsamples (bilinear) and min-max normalizes it to
``B×H×W`` in ``[0, 1]``. Every submodule's training flag is restored exactly afterwards.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unioncam.engine import default_batch_size, model_device
from unioncam.methods.targets import Target
from unioncam.ops import Precision, ieee_fp32, normalize, resolve_precision, upsample

Details = dict[str, Any]
PIXEL_SLACK = 1e-3  # resampling may overshoot [0, 1] by a rounding error
Targets = Tensor | Sequence[int] | Sequence[Target] | None  # classes, or callables on one image's logits


@dataclass
class Explanation:
    """The result of explaining a batch.

    Attributes:
        maps: ``B×H×W`` float maps in ``[0, 1]`` at the input's size.
        targets: ``B`` class indices that the maps explain.
        details: per-image values (tensors of length ``B`` or lists), method-specific.
    """

    maps: Tensor
    targets: Tensor
    details: Details = field(default_factory=dict)


def find_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """Resolve ``layer`` (a dotted name, a module, or None for the model's default) to a module.

    Names are looked up in ``model``, then inside ``model.net`` (a :class:`PixelModel`'s
    classifier), so ``"features.29"`` works for a wrapped VGG16.
    """
    if layer is None:
        layer = getattr(model, "target_layer", None)
        if layer is None:
            raise ValueError("target_layer is required for models not built by unioncam.models.load")
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError("target_layer module is not part of the model")
        return layer
    for root in (model, getattr(model, "net", None)):
        if isinstance(root, nn.Module):
            try:
                return root.get_submodule(layer)
            except AttributeError:
                continue
    names = [n for n, _ in model.named_modules() if n]
    raise ValueError(f"no layer {layer!r} in the model; some valid names: {', '.join(names[-8:])}")


def model_name(model: nn.Module) -> str:
    """A model's name for one-line errors: its ``name`` attribute, else the class of the network it
    wraps (a :class:`~unioncam.models.PixelModel`'s ``net``), else its own class."""
    name = getattr(model, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(getattr(model, "net", model)).__name__


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; afterwards (also on an exception) every submodule's
    ``training`` flag is set back to exactly what it was, so a model in training mode with some
    modules frozen in eval mode (``model.train(); model.features[0].eval()``) comes back as it was."""
    modes = {m: m.training for m in model.modules()}
    if any(modes.values()):  # a frozen model (unioncam.load's) is in eval mode already: nothing to switch
        model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            if module.training != training:  # Module.__setattr__ is slow: only the flags that moved
                module.training = training


Reshape = Callable[[Tensor], Tensor]


def twice_differentiable(on: bool) -> contextlib.AbstractContextManager[None]:
    """When ``on``: attention in the forward uses PyTorch's plain (math) kernel, whose backward can be
    differentiated again (the fused flash and memory-efficient kernels' cannot); otherwise nothing."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def hessian_vector_products(acts: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """``H·A`` per layer: ``∂(Σ g ⊙ A)/∂A`` with ``A`` held fixed in the product, from gradients
    ``g = ∂S/∂A`` taken with ``create_graph=True`` (pytorch-grad-cam's ``autograd.grad(grads, acts,
    grad_outputs=acts)``). Zero where ``g`` does not depend on ``A`` (a piecewise-linear network after
    the layer, or a gradient without a graph: frozen parameters after a linear head)."""
    out = [torch.zeros_like(a) for a in acts]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if live:
        found = torch.autograd.grad([grads[i] for i in live], [acts[i] for i in live],
                                    grad_outputs=[acts[i].detach() for i in live], allow_unused=True)
        for i, h in zip(live, found, strict=True):
            if h is not None:
                out[i] = h.detach()
    return out


class CAM(abc.ABC):
    """Base class: resolves the target layer once and hooks it during each call only.

    Subclasses set ``name`` and ``uses_gradients`` and implement :meth:`compute`. A method that
    reads several layers overrides :meth:`_resolve_layers` and :meth:`compute_layers`. Each call
    registers its forward hooks when it starts and removes them when its explaining forward ends
    (and in ``finally``), so the model carries no hook of ours between calls and a CAM object can
    be kept for many calls. It is still usable as a context manager (closing marks it closed).

    Args:
        model: a classifier taking pixel-space images (e.g. a :class:`unioncam.models.PixelModel`).
        target_layer: dotted module name or module; None uses ``model.target_layer``.
        batch_size: masked inputs per forward for score-based methods (None: by device).
        precision: "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "tf32", "bf16" or "fp16" (slow on
            CPU) for the masked forward-only passes (:func:`unioncam.ops.resolve_precision`).
            Everything else (the explaining forward and backward) runs in IEEE fp32, TF32 off.
        reshape: for a layer whose output is not ``B×K×h×w`` (a transformer's tokens), a function
            from the layer's raw output to ``B×K×h×w`` (:func:`unioncam.ops.vit_reshape`:
            ``vit_reshape(1)`` for ViT, ``nhwc_to_nchw`` for Swin's ``B×H×W×C``), as
            pytorch-grad-cam's ``reshape_transform``. The raw output is captured and differentiated;
            the reshape is applied to the activations and to the gradients afterwards. None:
            ``model.reshape_transform`` when the model has one, else no reshape (4-D outputs only).
    """

    name: ClassVar[str]
    uses_gradients: ClassVar[bool] = True
    class_targets: ClassVar[bool] = True  # compute() uses the target class (False: only the gradient of the score)
    # What a method declares for the evaluation service (which names no method itself):
    #: per-image details that become columns of the service's rows, name → Arrow type name
    #: (``float64``, ``int64``, ``string``): UnionCAM's β's and AMS branch, a seeded method's seed
    row_details: ClassVar[Mapping[str, str]] = {}
    #: maps of other methods computed along the way: ``{method: detail holding its B×H×W maps}``; a
    #: service asked for both takes them from here instead of running the other method
    provides: ClassVar[dict[str, str]] = {}
    #: masked forwards per image: one per target-layer channel whose map is not constant (score
    #: methods) when ``channel_forwards``, plus ``extra_forwards`` (progress counts)
    channel_forwards: ClassVar[bool] = False
    extra_forwards: ClassVar[int] = 0
    #: sections of the service's report about this method's details (``unioncam.service.report``)
    report_sections: ClassVar[tuple[str, ...]] = ()
    #: ``(method, why)``: a method whose maps this one equals in some settings, and why (the report
    #: says so when their rows agree)
    same_as: ClassVar[tuple[str, str] | None] = None
    #: the family ``parse_methods`` expands (``--methods gradient``): "gradient" (one forward and one
    #: backward), "score" (masked forwards), "activation" (the activations or weights alone)
    family: ClassVar[str] = "gradient"
    #: the method draws random numbers: it takes ``seed=`` and reports ``details["seed"]``; the same seed
    #: gives the same maps whatever the batch size or device
    seeded: ClassVar[bool] = False
    #: forwards after the explaining one that also hook the target layer (SmoothGrad-CAM++'s noisy
    #: passes, Ablation-CAM's ablated passes); False: every later forward runs without hooks of ours
    hooked_forwards: ClassVar[bool] = False
    #: also differentiate the class score with respect to the input (FullGrad): :meth:`compute_layers`
    #: then receives one more gradient after the layers' ones, ``∂S_c/∂x`` (``B×3×H×W``)
    input_gradient: ClassVar[bool] = False
    #: also take each layer's Hessian-vector product ``H·A = ∂(g · A)/∂A`` with ``A`` held fixed in the
    #: product (ShapleyCAM): :meth:`compute_layers` then receives, after the gradients above, one
    #: ``H·A`` per layer (reshaped like ``g``); the first backward keeps its graph for it, and attention
    #: runs PyTorch's math kernel in the explaining forward (:func:`twice_differentiable`)
    hessian_vector: ClassVar[bool] = False
    _handles: tuple[torch.utils.hooks.RemovableHandle, ...] = ()  # the hooks of the call in progress
    _closed = False

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None, *,
                 batch_size: int | None = None, precision: str = "auto", reshape: Reshape | None = None) -> None:
        self.model = model
        self.device = model_device(model)
        self.layers = self._resolve_layers(target_layer)
        self.batch_size = batch_size or default_batch_size(self.device)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.precision: Precision = resolve_precision(precision, self.device)
        self.reshape: Reshape | None = reshape if reshape is not None else getattr(model, "reshape_transform", None)
        if self.reshape is not None and not callable(self.reshape):
            raise TypeError(f"reshape must be a function of the layer's output, got {type(self.reshape).__name__}")
        self._acts: list[Tensor | None] = [None] * len(self.layers)

    def masked_forwards(self, images: int, channels: int, active: int, live: int) -> int:
        """The forwards after the explaining one that this method runs on ``images`` images whose
        target layer has ``channels`` channel maps in all, ``active`` of them not constant and ``live``
        of them not 0 everywhere (totals over the images), for progress within a batch: one per active channel when
        :attr:`channel_forwards`, plus :attr:`extra_forwards` per image. A method whose count
        depends on its options (SS-CAM's samples) overrides this."""
        return active * self.channel_forwards + images * self.extra_forwards

    @classmethod
    def detail_columns(cls) -> dict[str, str]:
        """The row columns this method's details fill: :attr:`row_details`, and ``seed`` (int64) for a
        :attr:`seeded` method (its ``details["seed"]``)."""
        return {**cls.row_details, **({"seed": "int64"} if cls.seeded else {})}

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options this method's constructor takes, its own first, then its bases' up to
        :class:`CAM` (``batch_size``, ``precision``, ``reshape``): SS-CAM's ``num_samples``, ``std``,
        ``seed``, ..., LeGrad's ``blocks``."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names += [p.name for p in inspect.signature(init).parameters.values()
                          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                          and p.name not in ("self", "model", "target_layer", *names)]
            if klass is CAM:
                break
        return names

    @classmethod
    def check_model(cls, model: nn.Module, target_layer: str | nn.Module | None = None,
                    input_size: tuple[int, int] | None = None) -> None:
        """Raise a one-line ``ValueError`` naming the method and the model when this method cannot
        explain ``model`` at ``target_layer`` (CAM without a global-pooling + linear head, FullGrad
        without biases); the default accepts every model. Cheap enough for a driver to call for every
        method before it starts workers (at most one forward of a random image of ``input_size``,
        default 224×224, on the model's device)."""
        return None  # a hook with a default, not an abstract method

    def _install_hooks(self) -> tuple[torch.utils.hooks.RemovableHandle, ...]:
        """Hook every module in ``self.layers`` for one explaining forward (see :meth:`__call__`)."""
        self._acts = [None] * len(self.layers)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_hook(functools.partial(self._hook, i)))
        finally:  # recorded even if one registration fails, so __call__'s finally removes them
            self._handles = tuple(handles)
        return self._handles

    def _uninstall_hooks(self) -> None:
        """Remove the hooks of the call in progress (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = ()

    def _resolve_layers(self, target_layer: str | nn.Module | None) -> list[nn.Module]:
        """The modules to hook; one target layer unless a subclass reads several."""
        return [find_layer(self.model, target_layer)]

    # -- hooks ------------------------------------------------------------------------------
    def _hook(self, i: int, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        """Capture layer ``i``'s output ``A`` during the explaining forward (the only forward
        that runs while the hooks exist).

        The network continues on a clone of ``A``, so an in-place op after the layer cannot modify
        it. ``A`` stays in the autograd graph when it already is (so with several hooked layers,
        ``∂S_c/∂A`` of an early layer includes the paths through later ones); otherwise it becomes
        a leaf that requires grad, so frozen parameters need no graph below it. With a ``reshape``,
        ``A`` is the raw output (any shape); the reshape is applied after the backward.
        """
        if self._acts[i] is not None:
            raise RuntimeError(f"layer {module} ran twice in one forward; choose a module used once")
        if not isinstance(output, Tensor) or (self.reshape is None and output.dim() != 4):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            hint = "; pass reshape=... for transformer token outputs (unioncam.ops.vit_reshape)" \
                if isinstance(output, Tensor) else ""
            raise RuntimeError(f"a target layer's output must be a B×K×h×w tensor, got {shape}{hint}")
        if not self.uses_gradients:
            self._acts[i] = output.detach().clone()
            return None
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        self._acts[i] = act
        return act.clone()

    def remove_hooks(self) -> None:
        """Close the instance (idempotent): it cannot explain afterwards. Hooks exist only during a
        call, so between calls there is nothing left to remove; kept for the context manager,
        ``__del__`` and existing callers."""
        self._uninstall_hooks()
        self._closed = True

    def __enter__(self) -> CAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def __del__(self) -> None:
        self.remove_hooks()

    # -- pipeline ---------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a B×3×H×W tensor in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        lo, hi = images.aminmax()
        if float(lo) < -PIXEL_SLACK or float(hi) > 1 + PIXEL_SLACK:  # e.g. 0-255 values, or already normalized
            raise ValueError(f"images must be pixels in [0, 1] (the model normalizes them itself), got values in "
                             f"[{float(lo):.3g}, {float(hi):.3g}]: divide 8-bit images by 255, do not apply mean/std")
        return images.to(self.device)

    def _check_targets(self, targets: Targets, logits: Tensor) -> tuple[Tensor, list[Target] | None]:
        """``(classes, scorers)``: the ``B`` class indices explained (-1 for a callable without a
        ``category``) and, for callable targets, the callables (:mod:`unioncam.methods.targets`)."""
        if targets is None:
            return logits.argmax(dim=1), None
        if not isinstance(targets, Tensor) and any(callable(t) for t in targets):
            scorers = list(targets)
            if len(scorers) != logits.shape[0] or not all(callable(t) for t in scorers):
                raise ValueError(f"callable targets: one callable per image is needed, got {len(scorers)} "
                                 f"items for {logits.shape[0]} images")
            classes = [getattr(t, "category", None) for t in scorers]
            if self.class_targets and None in classes:
                raise ValueError(f"{self.name} scores the target class's softmax probability: a callable target "
                                 "must name its class (a 'category' attribute, e.g. ClassifierOutputTarget(281))")
            t = torch.tensor([-1 if c is None else int(c) for c in classes], dtype=torch.long, device=logits.device)
            if bool((t >= logits.shape[1]).any()):
                raise ValueError(f"target categories must lie in [0, {logits.shape[1]}), got {t.tolist()}")
            return t, scorers  # type: ignore[return-value]
        t = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
        if t.numel() != logits.shape[0]:
            raise ValueError(f"got {t.numel()} targets for {logits.shape[0]} images")
        if bool(((t < 0) | (t >= logits.shape[1])).any()):
            raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got {t.tolist()}")
        return t, None

    def _grid(self, x: Tensor, batch: int) -> Tensor:
        """``x`` through :attr:`reshape` (when given), checked to be ``batch×K×h×w``."""
        if self.reshape is None:
            return x
        out = self.reshape(x)
        if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != batch:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"reshape must turn the layer's output {tuple(x.shape)} into a {batch}×K×h×w "
                               f"tensor, got {shape}")
        return out

    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation:
        """Explain ``images`` (``B×3×H×W`` in ``[0, 1]``) for ``targets``: None (the predicted class),
        class indices, or one callable per image on its logits (:mod:`unioncam.methods.targets`)."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed (remove_hooks() or the end of its with block)")
        images = self._check_images(images)
        if self.input_gradient:  # a leaf of its own: the caller's tensor is left as it was
            images = images.detach().requires_grad_(True)
        with ieee_fp32(), eval_mode(self.model):  # TF32 off: the explaining pass is fp32 whatever `precision` is
            try:
                self._install_hooks()
                try:
                    with torch.set_grad_enabled(self.uses_gradients), twice_differentiable(self.hessian_vector):
                        logits = self.model(images)
                finally:  # the methods' masked forwards (in compute) run without our hooks
                    self._uninstall_hooks()
                acts = [a for a in self._acts if a is not None]
                if len(acts) != len(self.layers):
                    raise RuntimeError("a target layer did not run in the forward pass")
                t, scorers = self._check_targets(targets, logits)
                grads = None
                if self.uses_gradients:  # samples are independent in eval mode: one backward of the sum
                    score = self.class_score(logits, t, scorers)
                    wrt = [*acts, images] if self.input_gradient else acts
                    grads = list(torch.autograd.grad(score, wrt, allow_unused=True, create_graph=self.hessian_vector))
                    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(wrt, grads, strict=True)]
                    if self.hessian_vector:
                        grads = [g.detach() for g in grads] + hessian_vector_products(acts, grads[:len(acts)])
                with torch.no_grad():
                    images = images.detach()
                    b = images.shape[0]
                    grids = [self._grid(a.detach(), b) for a in acts]
                    if grads is not None:
                        n, rest = len(acts), grads[len(acts):]
                        if self.hessian_vector:  # H·A is laid out like g: the same reshape
                            rest = rest[:-n] + [self._grid(h, b) for h in rest[-n:]]
                        grads = [self._grid(g, b) for g in grads[:n]] + rest
                    raw, details = self.compute_layers(images, t, grids, grads, logits.detach())
                    if not bool(torch.isfinite(raw).all()) or not bool(torch.isfinite(logits).all()):
                        # normalize() would turn NaN into a plausible all-zero map: refuse instead
                        raise FloatingPointError(f"{self.name}: non-finite logits or saliency (NaN/inf in the "
                                                 "model's weights or activations)")
                    maps = normalize(upsample(raw, (images.shape[-2], images.shape[-1])))
            finally:
                self._uninstall_hooks()
                self._acts = [None] * len(self.layers)
        return Explanation(maps=maps, targets=t, details=details)

    def class_score(self, logits: Tensor, targets: Tensor, scorers: Sequence[Target] | None) -> Tensor:
        """The scalar the explaining backward differentiates: the sum over images of the target logit
        ``S_c`` (or of each callable target on its image's logits). Finer-CAM overrides it."""
        if scorers is None:
            return logits.gather(1, targets[:, None]).sum()
        return torch.stack([f(logits[i]) for i, f in enumerate(scorers)]).sum()

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        """Raw saliency from every hooked layer; single-layer methods defer to :meth:`compute`."""
        return self.compute(images, targets, acts[0], None if grads is None else grads[0], logits)

    @abc.abstractmethod
    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        """Raw saliency ``B×h×w`` (any resolution; the base upsamples and normalizes) and details.

        Args:
            images: ``B×3×H×W`` input. targets: ``B`` classes. acts: ``A``, ``B×K×h×w`` (through
            :attr:`reshape` when one is set). grads: ``g = ∂S_c/∂A`` (taken w.r.t. the layer's raw
            output, then reshaped likewise; None when ``uses_gradients`` is False). logits: ``B×C``.
        """
