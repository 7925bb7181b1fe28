"""Evaluation metrics (REFERENCE.md, "Metrics"): per-sample values; aggregation is separate.

Per-sample values are what the Parquet rows store; :func:`summarize` aggregates them (mean and a
seeded 95% bootstrap confidence interval, overall and per class).

Conventions:
    * ``Y_i = f_c(I0)``, ``O_i = f_c(L ⊙ I0)``: softmax probabilities of the target class ``c``
      on the image and on the image masked by the method's normalized map ``L`` (pixel space).
    * ``protocol=`` (:mod:`unioncam.protocols`): ``"reference"`` (the default: REFERENCE.md, the
      conventions above), or ``"rise"``, ``"pytorch-grad-cam"``, ``"torchcam"``: those libraries'
      conventions, for numbers comparable with theirs.
    * Boxes are ``[xmin, ymin, xmax, ymax]`` in the map's pixel coordinates, continuous: the pixel
      in column ``x``, row ``y`` covers ``[x, x+1) × [y, y+1)`` and lies in a box when its centre
      ``(x + 0.5, y + 0.5)`` does. So integer boxes cover columns ``xmin … xmax−1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unioncam.engine import batched_probs, default_batch_size, model_device
from unioncam.ops import resolve_precision, safe_divide
from unioncam.protocols import Protocol, blur, curve_auc, curve_counts, get_protocol, saliency_ranks


def _check_maps(images: Tensor, maps: Tensor) -> None:
    if maps.dim() != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps must be B×H×W matching images {tuple(images.shape)}, got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or infinite values")


def confidence(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
               batch_size: int | None = None, precision: str = "fp32",
               protocol: str | Protocol = "reference") -> tuple[Tensor, Tensor]:
    """``(Y, O)`` with ``Y_i = f_c(I0_i)`` and ``O_i = f_c(L_i ⊙ I0_i)``, batched, in IEEE fp32 by
    default (so a method's ``precision`` changes its maps only). ``precision`` (``"fp16"``, ...) runs
    the metric forwards at reduced precision for speed on GPUs; the logits stay fp32 (the model's
    last ``Linear`` computes in fp32 under autocast). ``protocol`` (:mod:`unioncam.protocols`) says
    where ``L`` multiplies: the pixels (``reference``) or the model's normalized input.

    Args:
        images: ``B×3×H×W`` in ``[0, 1]``. maps: ``B×H×W`` in ``[0, 1]``. targets: ``B`` classes.
    """
    _check_maps(images, maps)
    p = get_protocol(protocol)
    space = p.masking(curves=False)
    b = images.shape[0]
    size = batch_size or default_batch_size(model_device(model))
    maps = maps.to(images.dtype)

    def inputs(sl: slice) -> Tensor:
        j = torch.arange(sl.start, sl.stop, device=images.device)
        i = j % b
        masked = p.from_space(model, maps[i][:, None] * p.to_space(model, images[i], space), space)
        return torch.where((j < b)[:, None, None, None], images[i], masked)

    probs = batched_probs(model, targets.to(images.device).repeat(2), inputs, 2 * b, size,
                          resolve_precision(precision, images.device))
    return probs[:b], probs[b:]


def _check_confidences(y: Tensor, o: Tensor) -> None:
    if y.shape != o.shape:
        raise ValueError(f"Y and O differ in shape: {tuple(y.shape)} vs {tuple(o.shape)}")
    if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(o).all())):
        raise ValueError("Y or O contains NaN or infinite values")
    if bool((y <= 0).any()):
        raise ValueError("Y must be > 0 (the drop is relative to Y); got a zero confidence")


def average_drop(y: Tensor, o: Tensor, protocol: str | Protocol = "reference") -> Tensor:
    """Per-sample drop ``100 · max(0, Y − O) / Y`` in percent; its mean is the Average Drop
    (Chattopadhay et al., 2018). Other protocols: :meth:`unioncam.protocols.Protocol.average_drop`
    (``pytorch-grad-cam``: ``100 · max(0, Y − O)``). Raises ``ValueError`` for ``Y ≤ 0`` or
    non-finite input."""
    _check_confidences(y, o)
    return get_protocol(protocol).average_drop(y, o)


def average_increase(y: Tensor, o: Tensor) -> Tensor:
    """Per-sample increase ``100 · 1[Y < O]`` in percent; its mean is the Average Increase."""
    _check_confidences(y, o)
    return 100.0 * (y < o).to(y.dtype)


def gaussian_blur(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur, an ``11``-tap sampled Gaussian of ``σ = 5`` px (normalized to sum 1)
    with reflect padding: the insertion baseline of REFERENCE.md (the ``reference`` protocol).

    Only the *parameters* (11 px, σ = 5) are RISE's. RISE's evaluation code builds its kernel with
    ``gkern(11, 5)``, a Gaussian-filtered point (nearly flat: centre/corner ratio 1.14), and pads with
    zeros, so its blurred baseline and its insertion AUCs differ from ours (issue 19 measured up to
    0.04 on EfficientNet-Lite0); the ``rise`` protocol (:mod:`unioncam.protocols`) uses RISE's."""
    curves = get_protocol("reference").curves
    assert curves is not None
    return blur(images, replace(curves, blur_size=kernel, blur_sigma=sigma))


def insertion_auc(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, steps: int | None = None,
                  batch_size: int | None = None, protocol: str | Protocol = "reference") -> Tensor:
    """Insertion AUC per image; see :func:`insertion_deletion`."""
    return insertion_deletion(model, images, maps, targets, steps, batch_size, protocol=protocol)[0]


def deletion_auc(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, steps: int | None = None,
                 batch_size: int | None = None, protocol: str | Protocol = "reference") -> Tensor:
    """Deletion AUC per image; see :func:`insertion_deletion`."""
    return insertion_deletion(model, images, maps, targets, steps, batch_size, protocol=protocol)[1]


def insertion_deletion(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, steps: int | None = None,
                       batch_size: int | None = None, precision: str = "fp32",
                       protocol: str | Protocol = "reference") -> tuple[Tensor, Tensor]:
    """RISE insertion and deletion AUCs (Petsiuk et al., 2018), per image, by ``protocol``'s recipe
    (:class:`unioncam.protocols.Curves`; ``steps`` None: the protocol's, 224 for ``reference``).

    ``reference``: pixels are ranked by the map (descending; ties by raster order). At step
    ``s = 0 … steps`` the first ``round(s · HW / steps)`` pixels are revealed on the blurred image
    (insertion) or set to black (deletion); ``f_c`` is taken after each step and the AUC is the
    trapezoid rule over the fraction revealed. Other protocols change the space the pixels are
    replaced in, the baselines, the step rule, the tie order and the AUC rule. All perturbed inputs
    (``2·B`` curves) run in batches of ``batch_size``, in IEEE fp32 unless ``precision`` says
    otherwise (as :func:`confidence`).
    """
    _check_maps(images, maps)
    p = get_protocol(protocol)
    if p.curves is None:
        raise ValueError(f"protocol {p.name!r} defines no insertion/deletion curves ({p.sources} has none)")
    curves = p.curves
    steps = curves.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    b, _, h, w = images.shape
    n_pix = h * w
    rank = saliency_ranks(maps, curves.ties)
    counts = curve_counts(n_pix, steps, curves.step_rule)
    revealed = counts.to(maps.device)
    x = p.to_space(model, images)
    start = blur(x, curves) if curves.insertion_start == "blur" else torch.zeros_like(x)
    per_image = counts.numel()
    size = batch_size or default_batch_size(model_device(model))

    def inputs(sl: slice) -> Tensor:
        j = torch.arange(sl.start, sl.stop, device=images.device)
        deleting, rest = j >= b * per_image, j % (b * per_image)
        i, s = rest // per_image, rest % per_image
        shown = (rank[i] < revealed[s][:, None]).view(-1, 1, h, w)
        inserted = torch.where(shown, x[i], start[i])
        deleted = torch.where(shown, torch.zeros_like(x[i]), x[i])
        return p.from_space(model, torch.where(deleting[:, None, None, None], deleted, inserted))

    t = targets.to(images.device).repeat_interleave(per_image).repeat(2)
    probs = batched_probs(model, t, inputs, 2 * b * per_image, size,
                          resolve_precision(precision, images.device)).view(2, b, per_image)
    return (curve_auc(probs[0], counts, n_pix, curves.auc), curve_auc(probs[1], counts, n_pix, curves.auc))


def _box_mask(boxes: Sequence[Sequence[float]], size: tuple[int, int], device: torch.device) -> Tensor:
    h, w = size
    if len(boxes) == 0:
        raise ValueError("energy pointing game needs at least one box per image; got an empty list")
    ys = torch.arange(h, device=device, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float64)[None, :] + 0.5
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
            raise ValueError(f"a box is [xmin, ymin, xmax, ymax] of finite numbers, got {list(box)}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty box {list(box)}: need xmax > xmin and ymax > ymin")
        mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask


def energy_pointing_game(maps: Tensor, boxes: Sequence[Sequence[Sequence[float]]]) -> Tensor:
    """Energy-based pointing game (Wang et al., 2020): ``Σ L inside ∪ boxes / Σ L`` per image.

    Args:
        maps: ``B×H×W`` non-negative maps.
        boxes: per image, a non-empty list of ``[xmin, ymin, xmax, ymax]`` (module docstring).
    Returns:
        ``B`` values in ``[0, 1]``; an all-zero map (no energy anywhere) scores 0.
    """
    if maps.dim() != 3 or len(boxes) != maps.shape[0]:
        raise ValueError(f"need B×H×W maps and one box list per map; got {tuple(maps.shape)} and {len(boxes)} lists")
    if not bool(torch.isfinite(maps).all()) or bool((maps < 0).any()):
        raise ValueError("maps must be finite and non-negative")
    size = (maps.shape[-2], maps.shape[-1])
    masks = torch.stack([_box_mask(b, size, maps.device) for b in boxes])
    total = maps.sum(dim=(1, 2))
    inside = (maps * masks).sum(dim=(1, 2))
    return safe_divide(inside, total, total > 0)


@dataclass(frozen=True)
class Summary:
    """Mean and bootstrap confidence interval of one metric over one group of samples."""

    group: str
    n: int
    mean: float
    ci_low: float
    ci_high: float


BOOT_CHUNK = 1 << 22  # resampled indices held at once by bootstrap_ci (32 MB of int64)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample with replacement ``n_boot`` times
    (NumPy ``default_rng(seed)``) and take the ``(1−level)/2`` and ``(1+level)/2`` quantiles.

    Resamples are drawn a chunk of rows at a time from the same generator, which gives the same
    indices as one ``n_boot × n`` draw, so at N = 50,000 it needs ~32 MB instead of 400 MB per 1000
    resamples."""
    rng = np.random.default_rng(seed)
    n = len(values)
    rows = max(1, BOOT_CHUNK // max(n, 1))  # resamples per chunk: memory O(BOOT_CHUNK), not O(n_boot·n)
    means = np.concatenate([values[rng.integers(0, n, size=(min(rows, n_boot - start), n))].mean(axis=1)
                            for start in range(0, n_boot, rows)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values: Sequence[float] | np.ndarray | Tensor, classes: Sequence[Any] | None = None,
              n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[Summary]:
    """Mean and seeded bootstrap CI overall (group ``"all"``) and, given ``classes``, per class.

    Raises:
        ValueError: empty input, NaN values, or ``classes`` of another length.
    """
    arr = (values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)).astype(np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("summarize needs a non-empty 1-D sequence of values")
    if not np.isfinite(arr).all():
        raise ValueError("summarize got NaN or infinite values; drop failed samples first")
    groups: list[tuple[str, np.ndarray]] = [("all", arr)]
    if classes is not None:
        labels = np.asarray([str(c) for c in classes])
        if labels.shape != arr.shape:
            raise ValueError(f"{labels.size} classes for {arr.size} values")
        groups += [(c, arr[labels == c]) for c in sorted(set(labels.tolist()))]
    return [Summary(name, len(v), float(v.mean()), *bootstrap_ci(v, n_boot, level, seed)) for name, v in groups]
