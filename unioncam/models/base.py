"""What every model family shares: the pixel-space wrapper, weight files, the loaded-model record.

A :class:`PixelModel` takes images in ``[0, 1]`` and applies the model's own normalization inside
``forward``, so every masking ``L ⊙ I0`` of the methods and metrics happens in pixel space
(docs/REFERENCE.md). :func:`read_state_dict` reads a weights file the same way for every family:
``torch.load(weights_only=True)`` or safetensors, a state dict possibly nested under
``state_dict`` or ``model``, keys possibly prefixed with ``module.`` (DataParallel).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unioncam import storage
from unioncam.models.fused import FusedNet, FuseError, can_fuse, fuse

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Reshape = Callable[[Tensor], Tensor]


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not match the architecture."""


class PixelModel(nn.Module):
    """``net((x - mean) / std)``: a classifier that takes ``B×3×H×W`` images in ``[0, 1]``.

    Layer names (``"features.29"``) are those of ``net``; :func:`unioncam.methods.base.find_layer`
    resolves them here or inside ``net``. ``target_layer`` is the default layer to explain, and
    ``reshape_transform`` (transformers) turns that layer's token output into a ``B×C×h×w`` grid.

    Speed options (:func:`unioncam.models.load` sets them; each keeps the results equal up to float
    rounding): :meth:`channels_last` stores conv weights NHWC, which PyTorch's CPU and cuDNN kernels
    run faster; :meth:`fuse_inference` runs the forward-only passes (no grad: the methods' masked
    forwards, the metrics: every pass run under ``torch.inference_mode``) through a copy with each
    BatchNorm folded into its convolution (:mod:`unioncam.models.fused`); :meth:`compile_inference` runs
    them through ``torch.compile`` instead. The explaining forward with its hooks (and its backward)
    always runs the network itself, eagerly, also for gradient-free methods, which run it under
    ``no_grad``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 target_layer: str | None = None, reshape_transform: Reshape | None = None) -> None:
        super().__init__()
        self.net = net
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._compiled: Callable[[Tensor], Tensor] | None = None
        self._pad_to: int | None = None
        self._channels_last = False
        self._fuse = False
        self._fused: FusedNet | None = None

    def channels_last(self) -> PixelModel:
        """Store 4-D weights in ``torch.channels_last``; convs then produce NHWC activations."""
        self._channels_last = True
        return self.to(memory_format=torch.channels_last)

    def compile_inference(self, pad_to: int | None = None, **options: Any) -> PixelModel:
        """Run grad-free forwards through ``torch.compile(**options)`` (compiled on first use).

        ``pad_to``: every grad-free batch is run at exactly this many images (a smaller one is
        padded with zeros and the padding's outputs dropped, a larger one is split), so the compiled
        graph never sees a new shape and never recompiles (one graph per dtype/autocast setting).
        None: shapes vary and torch.compile's automatic dynamic shapes handle them.
        """
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        options = {"dynamic": False, **options} if pad_to is not None else options
        self._compiled = torch.compile(self._forward, **options)
        self._pad_to = pad_to
        return self

    def fuse_inference(self) -> PixelModel:
        """Run grad-free forwards through a fused copy of ``net`` (:mod:`unioncam.models.fused`: each
        BatchNorm folded into its convolution, activations in place), built on first use and rebuilt
        when ``net`` changes as :meth:`FusedNet.current` sees it (call this again after changes it
        cannot see: writes through ``.data`` or NumPy, a folded module's settings such as a
        BatchNorm's ``eps``). ``net`` runs instead while any of its modules has a
        forward hook (a method's hooked forward) or is in training mode, and for good when it cannot be
        fused (a warning says why). A compiled forward (:meth:`compile_inference`) takes precedence."""
        self._fuse = True
        self._fused = None
        return self

    def fused(self) -> FusedNet | None:
        """The fused copy grad-free forwards would run now, building it if needed; None when fusion is
        off, not possible for this network, or ``net`` must run itself (see :meth:`fuse_inference`)."""
        if not self._fuse:
            return None
        fused = self._fused
        if fused is None or not fused.current(self.net):
            self._fused = None
            if not can_fuse(self.net):
                return None  # built once no hook or training-mode module is in the way
            try:
                fused = self._fused = fuse(self.net)
            except FuseError as exc:
                logging.getLogger(__name__).warning("%s; its forwards run unfused", exc)
                self._fuse = False
                return None
        return fused if fused.usable() else None

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PixelModel:
        self._fused = None  # .to(), .cpu(), .half(): the copy's folded weights would stay where they were
        return super()._apply(fn, recurse)

    def _compiled_forward(self, x: Tensor) -> Tensor:
        assert self._compiled is not None
        n, size = x.shape[0], self._pad_to
        if size is None or n == 0:
            return self._compiled(x)
        layout = torch.channels_last if self._channels_last else torch.contiguous_format
        outs = []
        for start in range(0, n, size):
            part = x[start:start + size]
            pad = part.new_zeros((size - part.shape[0], *part.shape[1:]))
            # always a fresh tensor in one layout: the compiled graph is specialized on strides and on
            # the tensor's kind (an inference tensor or not) as well as on shapes
            part = torch.cat([part, pad]).contiguous(memory_format=layout)
            outs.append(self._compiled(part)[: min(size, n - start)])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(self, x: Tensor, net: nn.Module | None = None) -> Tensor:
        mean = self.mean.to(x.dtype)
        std = self.std.to(x.dtype)
        return (self.net if net is None else net)((x - mean) / std)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            if self._compiled is not None:
                return self._compiled_forward(x)
            fused = self.fused()
            if fused is not None:
                return self._forward(x, fused.module)
        return self._forward(x)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class FP32Linear(nn.Linear):
    """A ``Linear`` that computes in fp32 even under autocast.

    :func:`load` gives each model's last ``Linear`` (the logits) this class, so reduced-precision
    forwards (``precision="bf16"``/``"fp16"``) keep full-precision logits: bf16 spaces values near a
    logit of 16 by 0.125, which would move softmax probabilities by ~10%. In fp32 it is a plain
    ``Linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype) if low else x)


@dataclass(frozen=True)
class LoadedModel:
    """A ready model and what explaining it needs.

    Attributes:
        name: the name it was loaded by (``vgg16``, ``torchvision:resnet50``, ``timm:convnext_tiny``,
            or ``custom:<class>`` for a module).
        model: the :class:`PixelModel` (eval mode, parameters frozen).
        target_layer: the default layer to explain (a dotted name inside ``model.net``).
        input_size: ``(H, W)`` the images are resized to.
        class_names: one name per logit.
        weights_sha256: SHA-256 of the weights file (None: seeded random weights).
        mean, std: the normalization ``model`` applies inside ``forward``.
        resize_size: the shorter side the family's own eval transform resizes to before its
            centre crop to ``input_size`` (torchvision's ``resize_size``, timm's
            ``input_size / crop_pct``); unioncam's data pipeline resizes straight to ``input_size``
            (the paper's protocol) and records this for reference only. None when unknown.
    """

    name: str
    model: PixelModel
    target_layer: str
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    weights_sha256: str | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | None = None


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names in torchvision's order (index = sorted-wnid position)."""
    from torchvision.models import VGG16_Weights

    return tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(n: int) -> tuple[str, ...]:
    """ImageNet's names for 1000 logits, else ``class_0 ... class_{n-1}``."""
    return imagenet_classes() if n == 1000 else tuple(f"class_{i}" for i in range(n))


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """``(state dict, sha256 of the file)`` from a weights file or URI (``s3://bucket/w.pth``).

    Accepted: a ``torch.save`` file read with ``weights_only=True`` (no code is unpickled), or a
    safetensors file (``.safetensors``, or recognised by its header); the state dict may sit under
    ``state_dict`` or ``model`` (training checkpoints), and a ``module.`` prefix on every key
    (``nn.DataParallel``) is dropped.

    Raises:
        WeightsError: missing or unreadable file, a file that needs code to unpickle, or one that
            holds no state dict of tensors (each message names the file).
    """
    location = os.fspath(path)
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {storage.redact(location)}") from None
    except OSError as exc:
        raise WeightsError(f"cannot read weights file: {exc}") from None
    shown = storage.redact(location)
    state: Any
    if location.endswith(".safetensors") or _looks_like_safetensors(data):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise WeightsError(f"{shown} is a safetensors file: pip install safetensors "
                               "(or 'unioncam[models]')") from None
        try:
            state = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise WeightsError(f"cannot read safetensors file {shown}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt files
            text = " ".join(str(exc).split())
            if "Unsupported global" in text:  # a reference to code (a class or function), not garbage bytes
                raise WeightsError(f"{shown} is not a plain state dict and was not loaded: it needs unpickling "
                                   "code beyond tensors, which could run arbitrary code (torch.load "
                                   f"weights_only=True refused it: {text})") from None
            raise WeightsError(f"cannot read weights file {shown} (corrupt or not a state dict); it was not "
                               f"loaded: {type(exc).__name__}: {text}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not isinstance(state.get(key), Tensor):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{shown} does not hold a state dict of tensors")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    return state, hashlib.sha256(data).hexdigest()


def _looks_like_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 1 < n <= len(data) - 8 and data[8:9] == b"{"


def load_state_dict(net: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load ``path`` (:func:`read_state_dict`) into ``net`` with strict key matching; returns the
    file's SHA-256.

    Raises:
        WeightsError: as :func:`read_state_dict`, or keys or shapes that do not match ``net``.
    """
    state, sha = read_state_dict(path)
    shown = storage.redact(os.fspath(path))
    mismatch = state_mismatch(net, state)
    if mismatch:
        raise WeightsError(f"{shown} does not match the architecture of {type(net).__name__}: {mismatch}")
    params = {name for name, _ in net.named_parameters()}
    bad = [k for k, v in state.items() if v.is_floating_point()
           and not bool((torch.isfinite(v) if k in params else ~torch.isnan(v)).all())]
    if bad:
        raise WeightsError(f"{shown} holds non-finite values (NaN{' or inf' if set(bad) & params else ''}) in "
                           f"{len(bad)} tensor(s), e.g. {', '.join(bad[:3])}: the file is damaged or the training "
                           "diverged; its model would give NaN scores")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # what state_mismatch does not see (a module's own checks)
        raise WeightsError(f"{shown} does not match the architecture: {' '.join(str(exc).split())[:300]}") from exc
    return sha


def state_mismatch(net: nn.Module, state: dict[str, Tensor], shown: int = 3) -> str:
    """How ``state``'s keys and shapes differ from ``net``'s ("" when they match): how many keys are
    missing, unexpected and mis-shaped, and at most ``shown`` of each."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(found)} {what} ({', '.join(found[:shown])}{', ...' if len(found) > shown else ''})"
             for what, found in (("keys missing", missing), ("unexpected keys", unexpected),
                                 ("mis-shaped tensors", shaped)) if found]
    return "; ".join(parts)


def state_sha256(net: nn.Module) -> str:
    """SHA-256 over a module's state dict (names and tensor bytes, in order): the identity of weights
    that came from a library's cache rather than a file the user named."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def last_spatial_layer(net: nn.Module, size: tuple[int, int]) -> str:
    """The module that last produces a ``B×C×h×w`` output with ``h·w > 1`` in a dry forward of a
    ``1×3×H×W`` zero image, among modules that run once (a reused module cannot be hooked): the
    usual CAM layer of an unknown CNN (the outermost one when several end together).

    Raises:
        ValueError: no module produces such an output (e.g. a transformer: pass ``target_layer``
            and ``reshape``).
    """
    calls: dict[str, int] = {}
    order: list[str] = []
    names = {id(m): n for n, m in net.named_modules() if n}

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in net.modules() if id(m) in names]
    was = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.inference_mode():
            net(torch.zeros((1, 3, *size), device=next((p.device for p in net.parameters()), None)))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was.items():
            m.training = flag
    once = [n for n in order if calls[n] == 1]
    if not once:
        raise ValueError("no layer of the model has a spatial B×C×h×w output: pass target_layer= "
                         "(and reshape= for a transformer's tokens)")
    logging.getLogger("unioncam.models").info("%s: explaining layer %s (the last spatial activation of a dry run)",
                                              type(net).__name__, once[-1])
    return once[-1]


def finish(name: str, net: nn.Module, mean: Sequence[float], std: Sequence[float], layer: str,
           size: tuple[int, int], classes: Sequence[str], sha: str | None, resize_size: int | None = None,
           reshape: Reshape | None = None, own: bool = True) -> LoadedModel:
    """Wrap ``net`` as a :class:`PixelModel`. A network unioncam built (``own``) is also put in eval
    mode, frozen, and its last ``Linear`` keeps fp32 logits under autocast (:class:`FP32Linear`); a
    module the user passed in is wrapped as it is (each explaining call sets eval mode and restores
    every submodule's flag afterwards)."""
    model = PixelModel(net, mean, std, layer, reshape)
    if own:
        model.eval().requires_grad_(False)
        linears = [m for m in net.modules() if type(m) is nn.Linear]
        if linears:
            linears[-1].__class__ = FP32Linear  # same parameters and names; fp32 logits under autocast
    return LoadedModel(name, model, layer, size, tuple(classes), sha, tuple(float(v) for v in mean),
                       tuple(float(v) for v in std), resize_size)
