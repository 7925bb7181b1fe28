"""Tensor operations shared by every method: upsampling, normalization, class scores.

Everything here stays in torch on the caller's device; nothing synchronizes with the GPU.
Conventions follow ``REFERENCE.md`` ("Conventions (all methods)").
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)  # "auto": fp16 on CUDA, fp32 elsewhere


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``N×h×w`` or ``N×C×h×w`` maps to ``size``.

    Returns the input unchanged when it already has that size.
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.dim() == 3:
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def normalize(maps: Tensor) -> Tensor:
    """Min-max normalization over the last two dimensions: ``(M - min) / (max - min)``.

    A constant map normalizes to all zeros (never NaN). Works on any leading shape.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return safe_divide(maps - lo, span, span > 0)


def min_max_eps(maps: Tensor, eps: float) -> Tensor:
    """``(m − min) / (max − min + eps)`` over the last two dimensions: the libraries' normalization
    (pytorch-grad-cam's ``scale_cam_image`` with ``eps = 1e-7``, TorchCAM's ``_normalize`` with ``1e-8``),
    where :func:`normalize` divides by the span alone (a constant map is 0 in both)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    shifted = maps - low
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + eps)


def safe_divide(num: Tensor | float, den: Tensor, where: Tensor | None = None) -> Tensor:
    """``num / den`` where ``where`` is True (default: where ``den != 0``), exactly 0 elsewhere.

    The denominator is replaced by 1 outside ``where`` before dividing, so neither the values nor
    the gradients (with respect to ``num`` or ``den``) get a NaN or inf from a zero denominator, as
    ``torch.where(den != 0, num / den, 0)`` would in its backward. Inside ``where`` the result is
    exactly ``num / den``. ``num``, ``den`` and ``where`` broadcast together.
    """
    mask = den != 0 if where is None else where
    quotient = num / torch.where(mask, den, torch.ones_like(den))
    return torch.where(mask, quotient, torch.zeros_like(quotient))


def is_constant(maps: Tensor) -> Tensor:
    """Boolean mask over the leading dimensions: True where a map (last two dims) is constant.

    Bilinear upsampling maps a constant map to a constant map and a non-constant map to a
    non-constant one, so this can be evaluated at the layer's own resolution.
    """
    return maps.amax(dim=(-2, -1)) <= maps.amin(dim=(-2, -1))


def is_zero(maps: Tensor) -> Tensor:
    """Boolean mask over the leading dimensions: True where a map (last two dims) is 0 everywhere (a dead
    channel; SS-CAM and IS-CAM do not forward these)."""
    return ~maps.ne(0).any(dim=-1).any(dim=-1)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run fp32 convolutions and matmuls in IEEE fp32 inside the block, restoring the flags after.

    PyTorch runs fp32 cuDNN convolutions as TF32 by default (10 mantissa bits, like fp16), so an
    "fp32" VGG16 on an Ampere-or-later GPU would not be fp32. Every explaining pass, masked
    forward and metric forward runs inside this block; reduced precision is asked for with
    ``precision`` instead. On CPU the flags have no effect. (It sets the legacy ``allow_tf32``
    flags: torch 2.14 refuses to read them once the newer ``fp32_precision`` API has given cuDNN's
    conv and RNN different settings, so a caller mixing the two gets that RuntimeError here.)
    """
    with _tf32(False):
        yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """cuDNN's and cuBLAS's TF32 flags set to ``enabled`` inside the block, the caller's after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32, matmul.allow_tf32 = enabled, enabled
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def check_precision(precision: str) -> str:
    """``precision`` if it is ``"auto"`` or one of :data:`PRECISIONS`, else a ``ValueError`` naming them."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISION_CHOICES)}")
    return precision


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """The precision the masked forward-only passes use on ``device``.

    ``"auto"`` (the default everywhere) is ``"fp16"`` on CUDA and ``"fp32"`` elsewhere: on the sample
    photos fp16 moved UnionCAM's Average Drop by +0.05 points (bf16: −2.14; benchmarks/
    bench_precision.py, measured on CPU by emulation and, by the issue's H100 run, +0.04 on a GPU),
    while IEEE fp32 convolutions are several times slower on GPUs. ``"tf32"`` runs fp32 tensors with
    TF32 convolutions and matmuls (10 mantissa bits) and is only ever used when asked for.
    """
    check_precision(precision)
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


_warned_cpu_fp16 = False


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Forward-only passes at ``precision``: IEEE fp32 (:func:`ieee_fp32`) for "fp32", TF32 for "tf32",
    else autocast to bf16 / fp16 (the ops autocast keeps in fp32 then run in IEEE fp32); "auto" is
    resolved by :func:`resolve_precision`.

    fp16 is meant for CUDA. On a CPU it computes with fp16 rounding, so it previews a GPU's fp16
    results (on the sample photos it moved UnionCAM's Average Drop by 0.05 points, bf16 by 2.1:
    benchmarks/bench_precision.py), but without native fp16 kernels it is much slower than fp32
    (13× on AVX-512 without FP16 instructions): the first such pass warns.
    """
    global _warned_cpu_fp16
    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type == "cpu" and not _warned_cpu_fp16:
        _warned_cpu_fp16 = True
        warnings.warn("precision 'fp16' on CPU rounds like a GPU's fp16 but is slow without native fp16 "
                      "kernels (13x slower than fp32 on AVX-512 without FP16); use 'fp32' for speed on CPU",
                      RuntimeWarning, stacklevel=3)
    if precision == "tf32":
        with _tf32(True):
            yield
        return
    with ieee_fp32():
        if precision == "fp32":
            yield
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


_BASELINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], Tensor]] = weakref.WeakKeyDictionary()


def black_image_probs(model: nn.Module, like: Tensor, precision: Precision = "fp32") -> Tensor:
    """Softmax vector ``f(Ib)`` of the all-black image ``Ib`` (zeros in pixel space), shape ``num_classes``.

    ``f_c(Ib)`` depends only on the model and the input size, so it is computed once per
    (model, size, device, dtype, precision) and cached (weakly keyed on the model). A model whose
    weights change afterwards must call :func:`clear_black_image_cache`.
    """
    key = (tuple(like.shape[1:]), like.device, like.dtype, precision)
    cache = _BASELINES.setdefault(model, {})
    if key not in cache:
        black = torch.zeros((1, *like.shape[1:]), dtype=like.dtype, device=like.device)
        with torch.inference_mode(), autocast(like.device, precision):
            logits = model(black)
        cache[key] = logits.to(torch.promote_types(like.dtype, torch.float32)).softmax(-1)[0]
    return cache[key]


def clear_black_image_cache(model: nn.Module | None = None) -> None:
    """Forget cached ``f(Ib)`` values for ``model`` (or for every model)."""
    if model is None:
        _BASELINES.clear()
    else:
        _BASELINES.pop(model, None)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` elements."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# -- token reshapes ---------------------------------------------------------------------------------
# A transformer layer outputs tokens, not a B×K×h×w grid. CAM (unioncam.methods.base) captures the raw
# output (the gradient is taken with respect to the raw tokens), then applies the reshape to both the
# activations and the gradients, as pytorch-grad-cam's reshape_transform does:
# - ViT / DeiT (B×N×C, class and distillation tokens first): vit_reshape(1) for ViT's blocks[-1].norm1,
#   vit_reshape(2) for distilled DeiT (timm's net.num_prefix_tokens);
# - Swin (timm): a stage's or block's output and a block's norm1 are B×H×W×C (nhwc_to_nchw); a block's
#   norm2 sees the flattened B×(H·W)×C tokens (vit_reshape(0)).
@dataclass(frozen=True)
class TokenGrid:
    """``B×N×C`` tokens to ``B×C×√n×√n`` after dropping the first ``prefix_tokens`` (``n = N − prefix``).

    A dataclass rather than a closure, so a CAM carrying it can be pickled (e.g. sent to a Ray worker).
    """

    prefix_tokens: int = 1

    def __post_init__(self) -> None:
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"vit_reshape expects B×N×C tokens, got shape {tuple(tokens.shape)}")
        b, n, c = tokens.shape
        n -= self.prefix_tokens
        side = math.isqrt(max(n, 0))
        if n <= 0 or side * side != n:
            raise ValueError(f"{tokens.shape[1]} tokens less {self.prefix_tokens} prefix token(s) leave {n}, "
                             "not a square grid; check prefix_tokens (timm: net.num_prefix_tokens)")
        return tokens[:, self.prefix_tokens:].reshape(b, side, side, c).permute(0, 3, 1, 2)


def vit_reshape(prefix_tokens: int = 1) -> TokenGrid:
    """A reshape for ViT-style ``B×N×C`` tokens: drop the first ``prefix_tokens`` (class /
    distillation tokens), lay the rest out on a square ``√n×√n`` grid, ``B×C×√n×√n``. A token
    count that is not a square after the prefix raises ``ValueError``."""
    return TokenGrid(prefix_tokens)


def nhwc_to_nchw(x: Tensor) -> Tensor:
    """``B×H×W×C`` (Swin's stages and blocks in timm) to ``B×C×H×W``."""
    if x.dim() != 4:
        raise ValueError(f"nhwc_to_nchw expects a B×H×W×C tensor, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)
