"""Metric protocols: the conventions a library or paper uses to compute "Average Drop" and
"insertion AUC", each one small declarative :class:`Protocol`, so our numbers can be compared with
published ones (``--protocol`` in the job and the CLI, ``protocol=`` in :mod:`unioncam.evaluation`).

========================  ==========  ==============  ===============================  =====================
protocol                  masks in    Average Drop    insertion / deletion baselines   steps, AUC
========================  ==========  ==============  ===============================  =====================
``reference`` (default)   pixels      relative to Y   Gaussian blur (reflect) / black  round(s·HW/steps), uniform
``rise``                  normalized† relative to Y   gkern blur (zero pad) / zeros    ⌈HW/steps⌉ px, uniform
``pytorch-grad-cam``      normalized  absolute        (none: grad-cam has no curves)   --
``torchcam``              normalized  relative, +1e-7 zeros / zeros                    ⌈HW/20⌉ px, trapezoid
========================  ==========  ==============  ===============================  =====================

† ``rise``: its curves; RISE defines no Average Drop, so ``rise``'s is ``reference``'s (pixels).

"normalized" means the operation is applied to the model's normalized input ``(x − mean) / std``:
there the map multiplies the normalized tensor (``L ⊙ x̂``, which in pixels is a blend towards the
dataset's mean colour, not towards black) and "zeros" is the mean colour. Every protocol scores
softmax probabilities of the target class; Average Drop and Increase are in percent (the libraries
return fractions: 100× theirs). Each field's source is in :data:`PROTOCOLS`' comments and in the
protocol's ``sources``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unioncam.registry import Registry

Space = Literal["pixel", "normalized"]


@dataclass(frozen=True)
class Curves:
    """How a protocol computes the insertion and deletion curves (Petsiuk et al., 2018).

    Attributes:
        steps: default number of steps (a run's ``--insdel-steps`` overrides it).
        step_rule: ``"round"``: point ``s = 0 … steps`` reveals ``round(s·HW/steps)`` pixels;
            ``"ceil"``: a step moves ``k = ⌈HW/steps⌉`` pixels, point ``i = 0 … ⌈HW/k⌉`` reveals
            ``min(i·k, HW)`` (the last step may be shorter).
        auc: ``"uniform"``: ``(Σ a − a₀/2 − a_last/2) / (points − 1)``, the trapezoid rule with equal
            spacing whatever the last step's length; ``"fraction"``: :func:`torch.trapezoid` over the
            fraction actually revealed (``counts / HW``).
        insertion_start: the insertion curve's first image: ``"blur"`` (of the image) or ``"zeros"``.
        blur_kernel: ``"gaussian"``: the ``blur_size``-tap sampled Gaussian of σ = ``blur_sigma``
            (sum 1); ``"gkern"``: RISE's kernel, a ``blur_size²`` delta filtered by
            ``scipy.ndimage.gaussian_filter(σ = blur_sigma)`` (:func:`gkern`).
        blur_padding: ``"reflect"`` or ``"zeros"`` at the image border.
        ties: pixels of equal saliency in ``"raster"`` order or ``"reverse-raster"`` order.
        deletion ends at zeros of the protocol's space in every protocol (black in pixel space).
    """

    steps: int
    step_rule: Literal["round", "ceil"]
    auc: Literal["uniform", "fraction"]
    insertion_start: Literal["blur", "zeros"]
    blur_kernel: Literal["gaussian", "gkern"] = "gaussian"
    blur_padding: Literal["reflect", "zeros"] = "reflect"
    blur_size: int = 11
    blur_sigma: float = 5.0
    ties: Literal["raster", "reverse-raster"] = "raster"


@dataclass(frozen=True)
class Protocol:
    """One library's or paper's conventions for Average Drop / Increase and insertion / deletion.

    Attributes:
        name: the ``--protocol`` name.
        space: where masking and baselines happen: ``"pixel"`` (images in ``[0, 1]``) or
            ``"normalized"`` (the model's input ``(x − mean)/std``).
        drop: ``"relative"``: ``100·max(0, Y−O)/(Y + drop_eps)``; ``"absolute"``: ``100·max(0, Y−O)``.
        drop_eps: added to ``Y`` in the relative drop's denominator.
        confidence_space: where ``L ⊙ I0`` (Average Drop / Increase) is taken, when not ``space``.
        curves: the insertion/deletion recipe, or None where the library has none.
        score: what ``Y`` and ``O`` are: softmax ``"probability"`` of the target class (all four).
        differs: one line, how it differs from ``reference`` (the report and docs/metrics.md print it).
        sources: where each value comes from.
    """

    name: str
    space: Space
    drop: Literal["relative", "absolute"]
    curves: Curves | None
    differs: str
    sources: str
    drop_eps: float = 0.0
    score: Literal["probability"] = "probability"
    confidence_space: Space | None = None

    def average_drop(self, y: Tensor, o: Tensor) -> Tensor:
        """Per-sample drop in percent (its mean is the Average Drop)."""
        gap = (y - o).clamp_min(0)
        return 100.0 * (gap / (y + self.drop_eps) if self.drop == "relative" else gap)

    def drop_array(self, y: np.ndarray, o: np.ndarray) -> np.ndarray:
        """:meth:`average_drop` on NumPy/pandas columns (NaN where ``y`` or ``o`` is missing)."""
        gap = np.clip(y - o, 0, None)
        return 100.0 * (gap / (y + self.drop_eps) if self.drop == "relative" else gap)

    def masking(self, curves: bool) -> Space:
        """The space of the curves (``curves``) or of ``L ⊙ I0``."""
        return self.space if curves or self.confidence_space is None else self.confidence_space

    def to_space(self, model: nn.Module, images: Tensor, space: Space | None = None) -> Tensor:
        """Pixels ``[0, 1]`` → ``space`` (default: this protocol's)."""
        if (space or self.space) == "pixel":
            return images
        mean, std = _mean_std(model, self.name)
        return (images - mean.to(images)) / std.to(images)

    def from_space(self, model: nn.Module, values: Tensor, space: Space | None = None) -> Tensor:
        """``space`` (default: this protocol's) → the pixels a :class:`~unioncam.models.base.PixelModel` takes."""
        if (space or self.space) == "pixel":
            return values
        mean, std = _mean_std(model, self.name)
        return values * std.to(values) + mean.to(values)


def _mean_std(model: nn.Module, protocol: str) -> tuple[Tensor, Tensor]:
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if not isinstance(mean, Tensor) or not isinstance(std, Tensor):
        raise ValueError(f"protocol {protocol!r} masks the model's normalized input: the model needs `mean` and "
                         "`std` buffers (a unioncam PixelModel, e.g. from unioncam.models.load)")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


PROTOCOLS: Registry[Protocol] = Registry("protocol")
for _p in (
    Protocol(
        name="reference", space="pixel", drop="relative",
        # REFERENCE.md, "Metrics": AD/AI of Chattopadhay et al. on L ⊙ I0 in pixels; RISE's curves
        # with its parameters (11 px, σ = 5) but a sampled Gaussian and reflect padding, black for deletion.
        curves=Curves(steps=224, step_rule="round", auc="uniform", insertion_start="blur"),
        differs="REFERENCE.md: masks pixels, drop relative to Y, sampled-Gaussian reflect-padded blur, black deletion",
        sources="REFERENCE.md (Metrics); Chattopadhay et al. 2018 (AD/AI); Petsiuk et al. 2018 (insertion/deletion)"),
    Protocol(
        name="rise", space="normalized", drop="relative",
        # eclique/RISE evaluation.py: CausalMetric(model, 'ins', 224, substrate_fn=blur) with
        # blur = conv2d(x, gkern(11, 5), padding=11 // 2) (zero padding) and 'del' with torch.zeros_like,
        # on the normalized tensor; n_steps = (HW + step − 1) // step; auc(arr) = (Σ − a₀/2 − a_n/2)/(n − 1);
        # salient_order = flip(argsort(map)): ties in reverse raster order (argsort stable here; NumPy's
        # default quicksort leaves their order unspecified). RISE passes step = 224 pixels: at 224² that
        # is 224 steps, what `steps` says at any size. RISE scores its top-1 class (target=predicted).
        # RISE defines no Average Drop: AD/AI are reference's (pixel-space L ⊙ I0, relative drop).
        curves=Curves(steps=224, step_rule="ceil", auc="uniform", insertion_start="blur", blur_kernel="gkern",
                      blur_padding="zeros", ties="reverse-raster"), confidence_space="pixel",
        differs="RISE's code for the curves: normalized input, nearly flat gkern(11, 5) zero-padded blur, deletion "
                "to the mean colour; AD/AI as reference",
        sources="RISE reference code (Petsiuk et al. 2018, evaluation.py: gkern, CausalMetric, auc)"),
    Protocol(
        name="pytorch-grad-cam", space="normalized", drop="absolute", curves=None,
        # pytorch_grad_cam/metrics/cam_mult_image.py 1.5.7: multiply_tensor_with_cam = input_tensor * cam
        # (normalized), DropInConfidence = max(0, −(O − Y)), IncreaseInConfidence = (O − Y > 0), with
        # ClassifierOutputSoftmaxTarget targets (probabilities).
        differs="grad-cam 1.5.7: map multiplies the normalized input, absolute drop max(0, Y−O); no curves",
        sources="pytorch-grad-cam 1.5.7 metrics/cam_mult_image.py (DropInConfidence, IncreaseInConfidence, "
                "CamMultImageConfidenceChange)"),
    Protocol(
        name="torchcam", space="normalized", drop="relative", drop_eps=1e-7,
        # torchcam 0.5.0 metrics.py: ClassificationMetric drop = relu(Y − O) / (Y + 1e-7) on cam * input
        # (normalized); DeletionInsertionMetric(steps=20, baseline=None → zeros), step = ⌈N/steps⌉,
        # counts = [*range(0, N, step), N], AUC = torch.trapezoid(curve, counts / N), stable ranks.
        curves=Curves(steps=20, step_rule="ceil", auc="fraction", insertion_start="zeros"),
        differs="torchcam 0.5.0: normalized input, Y + 1e-7 in the drop, 20 steps from/to zeros, trapezoid on fraction",
        sources="torchcam 0.5.0 metrics.py (ClassificationMetric, DeletionInsertionMetric)"),
):
    PROTOCOLS.add(_p.name, _p)
PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS.get(n).name for n in PROTOCOLS.names())


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The protocol named ``protocol`` (or ``protocol`` itself); an unknown name lists the valid ones."""
    return protocol if isinstance(protocol, Protocol) else PROTOCOLS.get(protocol)


def curve_counts(n_pix: int, steps: int, rule: Literal["round", "ceil"]) -> Tensor:
    """Pixels revealed (insertion) or removed (deletion) at each point of the curve, float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rule == "round":
        return torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_pix / steps)
    step = -(-n_pix // steps)
    return torch.arange(-(-n_pix // step) + 1, dtype=torch.float64).mul(step).clamp(max=n_pix)


def curve_auc(curve: Tensor, counts: Tensor, n_pix: int, rule: Literal["uniform", "fraction"]) -> Tensor:
    """AUC of curves (last dim: one value per point of :func:`curve_counts`)."""
    if rule == "uniform":
        return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (curve.shape[-1] - 1)
    return torch.trapezoid(curve, (counts / n_pix).to(curve), dim=-1)


def gkern(size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's blur kernel: a ``size × size`` delta smoothed by ``scipy.ndimage.gaussian_filter(σ)``
    (default ``mode="reflect"``, ``truncate=4``), computed here without SciPy. The filter is
    separable, so the kernel is ``k ⊗ k`` with ``k`` the 1-D filter of a centred delta: taps
    ``w_t ∝ exp(−t²/2σ²)``, ``|t| ≤ ⌊4σ + ½⌋``, read through the half-sample symmetric extension
    (``d c b a | a b c d | d c b a``, repeated while the radius exceeds the array). It sums to 1
    and is nearly flat at σ = 5 (centre/corner 1.14)."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    centre = size // 2
    k = np.zeros(size)
    for i in range(size):
        j = (i + t) % (2 * size)  # the symmetric extension has period 2·size
        j = np.where(j >= size, 2 * size - 1 - j, j)
        k[i] = w[j == centre].sum()
    return torch.from_numpy(np.outer(k, k))


def blur(images: Tensor, curves: Curves) -> Tensor:
    """The insertion baseline of ``curves``: per-channel 2-D convolution with its kernel and padding."""
    size, half = curves.blur_size, curves.blur_size // 2
    c = images.shape[1]
    out = F.pad(images, (half,) * 4, mode="reflect" if curves.blur_padding == "reflect" else "constant")
    if curves.blur_kernel == "gkern":
        return F.conv2d(out, gkern(size, curves.blur_sigma).to(images).expand(c, 1, size, size), groups=c)
    x = torch.arange(size, dtype=images.dtype, device=images.device) - half
    k1 = torch.exp(-(x**2) / (2 * curves.blur_sigma**2))
    k1 = k1 / k1.sum()
    out = F.conv2d(out, k1.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k1.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def saliency_ranks(maps: Tensor, ties: Literal["raster", "reverse-raster"]) -> Tensor:
    """``B×HW`` rank of each pixel (0: most salient), descending saliency, ties as ``ties`` says."""
    flat = maps.reshape(maps.shape[0], -1)
    n = flat.shape[1]
    if ties == "raster":
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    else:  # flip(argsort(v)): descending, equal values from the last pixel back
        order = (n - 1) - torch.sort(flat.flip(1), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=maps.device).expand(flat.shape[0], -1))
    return rank


def describe(protocol: str | Protocol) -> str:
    """One line for logs and reports: the protocol's name and how it differs from ``reference``."""
    p = get_protocol(protocol)
    return f"{p.name}: {p.differs}"


__all__ = ["PROTOCOLS", "PROTOCOL_NAMES", "Curves", "Protocol", "blur", "curve_auc", "curve_counts", "describe",
           "get_protocol", "gkern", "saliency_ranks"]
