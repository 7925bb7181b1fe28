"""ROAD: RemOve And Debias (Rong et al., 2022), batched on the images' device.

ROAD removes a percentile of the pixels a map ranks most (MoRF) or least (LeRF) relevant, fills
them by *noisy linear imputation* and takes ``f_c`` of the result. This module computes what
pytorch-grad-cam 1.5.7 computes (``pytorch_grad_cam.metrics.road``: ``ROADMostRelevantFirst``,
``ROADLeastRelevantFirst``, their ``...Average`` over percentiles and ``ROADCombined``, with
``NoisyLinearImputer``), but for every image, percentile and order at once, with the linear
systems solved together by a preconditioned conjugate gradient in torch instead of one SciPy
``spsolve`` per image and percentile.

Conventions (grad-cam's, from ``perturbation_confidence.py`` and ``road.py``):
    * MoRF at percentile ``p``: ``t = percentile(L, p)`` (NumPy's default linear interpolation,
      :func:`percentile`), the pixels with ``L >= t`` are removed. LeRF: the same on ``1 − L``.
    * Imputation: each removed pixel is the weighted mean of its in-image 8 neighbours, weights
      ``1/6`` (edge-adjacent) and ``1/12`` (diagonal); neighbours that are removed too are unknowns
      of the same linear system. Then ``noise · ε``, ``ε ~ N(0, 1)``, is added to each imputed value.
    * grad-cam imputes the model's *normalized* tensor ``(x − mean) / std`` and its ``noise = 0.01``
      is in those units. The mean-value system is affine-equivariant per channel (the weights of
      each equation sum to its diagonal), so imputing pixel-space images and normalizing gives the
      same values; the noise is then ``noise · std_c`` per channel in pixel space (:func:`impute`'s
      ``std``).
    * grad-cam reports ``f_c(imputed) − f_c(I0)`` per percentile (:func:`road_drop`) and
      ``ROADCombined = (mean_p LeRF − mean_p MoRF) / 2`` (:func:`road_combined`; ``f_c(I0)`` cancels).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unioncam.engine import batched_probs, default_batch_size, model_device
from unioncam.evaluation.base import (
    ColumnType,
    CurvePanel,
    Format,
    MapBatch,
    Metric,
    ReportFacts,
    TableColumn,
    Values,
    check_maps,
)
from unioncam.models.base import PixelModel
from unioncam.ops import resolve_precision

PERCENTILES: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # grad-cam's ...Average default

# grad-cam's ``neighbors_weights``: offset (row, column) → weight; each pixel's weights sum to 1
# inside the image, and a neighbour outside it is dropped with its weight.
_WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
            (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}
_OFFSETS = tuple((di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1))  # a 9-point stencil's taps; 4 is the centre

RTOL = 1e-9  # CG stops when ‖r‖₂ ≤ RTOL · ‖b‖₂ for every system (see impute)
MAX_ITER = 200  # CG iteration cap (≤ 14 were needed in tests/evaluation/test_road.py); beyond it: RuntimeError
# road(): at most this many pixel values (masks · C·H·W) per impute call. impute's float64 work space
# peaks at ~35 MB per 3×224×224 mask (ru_maxrss, CPU), so ~200 MB on CPU (6 masks) and ~0.9 GB on
# CUDA (27 masks). On two CPU cores 1-8 masks per call cost ~65 ms each, 24 per call 200 ms each.
IMPUTE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 22}


def percentile(values: Tensor, percentiles: Sequence[float]) -> Tensor:
    """NumPy's ``np.percentile(v, p)`` (default ``method="linear"``) of each row of ``values``
    (``B×N``), bit for bit in ``values``' dtype; returns ``B×P``.

    With ``v`` sorted, ``k = (N − 1) · p / 100`` (float64), ``j = ⌊k⌋``, ``γ = k − j``:
    ``v_j + (v_{j+1} − v_j) · γ``, or ``v_{j+1} − (v_{j+1} − v_j) · (1 − γ)`` when ``γ ≥ 0.5``,
    evaluated as NumPy does for a scalar ``p`` (``_lerp`` with a weak Python-float ``γ``, so in
    ``values``' dtype). ``torch.quantile(..., interpolation="linear")`` is the same formula but
    computes ``k`` in ``values``' dtype: for float32 maps it differed from NumPy in the last bit
    for 14% of random cases (and for 1.3% when run in float64 and rounded), and a threshold one ulp
    off can move a pixel across ``L >= t``.
    """
    n = values.shape[-1]
    ordered = values.sort(dim=-1).values
    out = []
    for p in percentiles:
        k = (n - 1) * (float(p) / 100)
        j = min(max(math.floor(k), 0), n - 1)
        gamma = k - j
        lo, hi = ordered[:, j], ordered[:, min(j + 1, n - 1)]
        diff = hi - lo
        if gamma >= 0.5:
            out.append(hi - diff * torch.tensor(1 - gamma, dtype=values.dtype, device=values.device))
        else:
            out.append(lo + diff * torch.tensor(gamma, dtype=values.dtype, device=values.device))
    return torch.stack(out, dim=1)


def _shift(padded: Tensor, di: int, dj: int, size: Sequence[int]) -> Tensor:
    """``x(p + (di, dj))`` for every ``p`` from ``padded = F.pad(x, (1, 1, 1, 1))`` (0 outside)."""
    return padded[..., 1 + di:1 + di + size[0], 1 + dj:1 + dj + size[1]]


def _neighbour_sum(x: Tensor) -> Tensor:
    """``Σ_o w_o x(p + o)`` over the 8 neighbours, those outside the image dropped."""
    padded, size = F.pad(x, (1, 1, 1, 1)), x.shape[-2:]
    out = torch.zeros_like(x)
    for (di, dj), weight in _WEIGHTS.items():
        out.add_(_shift(padded, di, dj, size), alpha=weight)
    return out


def _apply(stencil: Tensor, x: Tensor) -> Tensor:
    """``(A x)(p) = Σ_k a_k(p) x(p + o_k)``: ``stencil`` ``N×9×h×w`` (one operator per system, shared
    by the ``C`` channels of ``x``, ``N×C×h×w``)."""
    padded, size = F.pad(x, (1, 1, 1, 1)), x.shape[-2:]
    out = stencil[:, 4:5] * x
    for k, (di, dj) in enumerate(_OFFSETS):
        if k != 4:
            out.addcmul_(stencil[:, k:k + 1], _shift(padded, di, dj, size))
    return out


def _coarse_size(n: int) -> int:
    """Coarse nodes along an axis of ``n`` fine pixels: node ``J`` sits at fine ``2J``, the last one
    at or just past the last pixel, so the coarse space holds the constants up to the edges."""
    return n // 2 + 1


def _prolong(y: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear interpolation ``P y`` (separable ``[½, 1, ½]``) from the coarse grid to ``size``."""
    for axis, n in ((-1, size[1]), (-2, size[0])):
        y = y.movedim(axis, -1)
        fine = y.new_zeros((*y.shape[:-1], 2 * y.shape[-1] - 1))
        fine[..., 0::2] = y
        fine[..., 1::2] = (y[..., :-1] + y[..., 1:]) / 2
        y = fine[..., :n].movedim(-1, axis)
    return y


def _restrict(x: Tensor) -> Tensor:
    """``Pᵀ x``, the adjoint of :func:`_prolong` (full weighting ``[½, 1, ½]`` per axis)."""
    for axis in (-1, -2):
        x = x.movedim(axis, -1)
        m = _coarse_size(x.shape[-1])
        x = F.pad(x, (0, 2 * m - 1 - x.shape[-1]))
        odd = x[..., 1::2] / 2
        coarse = x[..., 0::2].clone()
        coarse[..., :-1] += odd
        coarse[..., 1:] += odd
        x = coarse.movedim(-1, axis)
    return x


class _Multigrid:
    """The imputation systems ``A x = b`` of one batch, one per image and channel, and a multigrid
    V-cycle that preconditions CG on them.

    Unknowns are the removed pixels (``u = 1``). ``(A x)_i = d_i x_i − Σ_j w_ij x_j`` with ``d_i`` the
    sum of the in-image neighbour weights (1 inside, 2/3 on edges, 1/2 in corners; grad-cam's
    ``sum_neighbors``) and ``b_i = Σ_k w_ik v_k`` over the kept neighbours ``k``: grad-cam's
    ``A``, ``b`` with both signs flipped. Kept pixels get identity rows (decoupled, ``x = 0``).
    ``A`` is symmetric (``w_ij = w_ji``) and, when a system has a kept pixel, positive definite
    (irreducibly diagonally dominant: every 8-connected removed region borders a kept pixel).

    Preconditioner: one symmetric V-cycle. Level ``l + 1`` has ``⌊n/2⌋ + 1`` nodes per axis of
    level ``l``'s ``n`` (down to ≤ 3), bilinear prolongation ``P`` (times ``u`` into the finest level,
    so coarse functions live on the unknowns), the Galerkin operator ``A_{l+1} = Pᵀ A_l P`` (9-point
    again, probed exactly with a 3×3 colouring), one Jacobi sweep before and one after the coarse
    correction with ``D_i = 1.05 · max(a_ii, ½ Σ_j |a_ij|)``, and the pseudo-inverse on the coarsest
    level. ``D`` is plain Jacobi inside removed regions, and ``2D − A`` is strictly diagonally dominant
    on every level, so the smoother converges (``D = ½ Σ_j |a_ij|`` alone diverged on isolated
    removed pixels). ``u P`` can make coarse functions dependent, so a coarse operator may be
    singular; its null space prolongs to zero on the unknowns. The V-cycle is symmetric positive
    definite, so PCG converges to the exact solution and the preconditioner only sets how fast:
    2–14 iterations here, where BPX diagonal scaling took 40–190 and Jacobi alone grows with the
    removed regions' diameter.
    """

    def __init__(self, removed: Tensor, dtype: torch.dtype) -> None:
        u = removed[:, None].to(dtype)
        self.u = u
        stencil = torch.empty((u.shape[0], 9, *u.shape[-2:]), dtype=dtype, device=u.device)
        padded = F.pad(u, (1, 1, 1, 1))
        for k, (di, dj) in enumerate(_OFFSETS):
            if k != 4:
                stencil[:, k:k + 1] = -_WEIGHTS[di, dj] * u * _shift(padded, di, dj, u.shape[-2:])
        stencil[:, 4:5] = u * _neighbour_sum(torch.ones_like(u)) + (1 - u)
        self.stencils = [stencil]
        while max(self.stencils[-1].shape[-2:]) > 3:
            self.stencils.append(self._galerkin(len(self.stencils) - 1))
        self.smoother = [1.05 * torch.maximum(s[:, 4:5], s.abs().sum(dim=1, keepdim=True) / 2) for s in self.stencils]
        values, self.vectors = torch.linalg.eigh(self._dense(self.stencils[-1]))
        self.inverse_values = torch.where(values > 1e-12 * values[:, -1:], 1 / values, 0)

    def rhs(self, images: Tensor) -> Tensor:
        """``b`` from the kept pixels of ``images``."""
        return self.u * _neighbour_sum(images * (1 - self.u))

    def apply(self, x: Tensor) -> Tensor:
        """``A x`` on the finest level."""
        return _apply(self.stencils[0], x)

    def _down(self, level: int, r: Tensor) -> Tensor:
        return _restrict(self.u * r if level == 0 else r)

    def _up(self, level: int, y: Tensor) -> Tensor:
        fine = _prolong(y, self.stencils[level].shape[-2:])
        return self.u * fine if level == 0 else fine

    def _galerkin(self, level: int) -> Tensor:
        """``Pᵀ A_level P`` as a 9-point stencil: probe ``c`` is 1 on the coarse nodes of colour
        ``c = (I mod 3, J mod 3)``, so ``(Pᵀ A P e_c)(R)`` is the coupling of ``R`` with the one node of
        colour ``c`` in its 3×3 neighbourhood. A node whose function misses every unknown gets an
        identity row."""
        n, _, h, w = self.stencils[level].shape
        size = (_coarse_size(h), _coarse_size(w))
        probes = torch.zeros((1, 9, *size), dtype=self.u.dtype, device=self.u.device)
        for c in range(9):
            probes[:, c, c // 3::3, c % 3::3] = 1
        energy = self._down(level, _apply(self.stencils[level], self._up(level, probes.expand(n, 9, *size))))
        padded = F.pad(probes, (1, 1, 1, 1))
        coarse = torch.stack([(energy * _shift(padded, di, dj, size)).sum(dim=1) for di, dj in _OFFSETS], dim=1)
        coarse[:, 4] = torch.where(coarse[:, 4] > 0, coarse[:, 4], 1)
        return coarse

    @staticmethod
    def _dense(stencil: Tensor) -> Tensor:
        """The ``N×m×m`` matrices of a small stencil (``m = h·w``), column by column."""
        n, _, h, w = stencil.shape
        eye = torch.eye(h * w, dtype=stencil.dtype, device=stencil.device).view(1, h * w, h, w)
        return _apply(stencil, eye.expand(n, -1, -1, -1)).flatten(2).transpose(1, 2)

    def precondition(self, r: Tensor, level: int = 0) -> Tensor:
        """One V-cycle on ``A_level z = r`` from ``z = 0``."""
        if level == len(self.stencils) - 1:
            n, c, h, w = r.shape
            coords = self.vectors.transpose(1, 2) @ r.flatten(2).transpose(1, 2)
            return (self.vectors @ (self.inverse_values[..., None] * coords)).transpose(1, 2).reshape(n, c, h, w)
        stencil, smoother = self.stencils[level], self.smoother[level]
        z = r / smoother
        z = z + self._up(level, self.precondition(self._down(level, r - _apply(stencil, z)), level + 1))
        return z + (r - _apply(stencil, z)) / smoother


def impute(images: Tensor, removed: Tensor, noise: float = 0.0,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           std: Tensor | Sequence[float] | None = None, rtol: float = RTOL, max_iter: int = MAX_ITER) -> Tensor:
    """grad-cam's ``NoisyLinearImputer`` for a whole batch on ``images``' device.

    Every removed pixel becomes the weighted mean of its in-image 8 neighbours (``1/6`` edge, ``1/12``
    diagonal; see :class:`_Multigrid`), all removed pixels of an image solved jointly, then
    ``noise · std_c · ε`` (``ε ~ N(0, 1)`` from ``generator``) is added to them; kept pixels are
    returned unchanged.

    Solver: preconditioned conjugate gradient (:class:`_Multigrid`), all ``B·C`` systems at once, in
    float64 whatever ``images``' dtype, from ``x = 0``, until ``‖r‖₂ ≤ rtol · ‖b‖₂`` for every system.
    float64 because the systems are ill-conditioned (``κ`` grows with the squared diameter of a
    removed region, ~10⁴ at 224×224 with 90% removed) and fp32 CG's attainable accuracy
    (~``κ · 6e-8``) would be ~1e-3 in pixel values. ``rtol = 1e-9`` kept the imputed values within
    ~6e-8 (float32 rounding) of SciPy's ``spsolve``, what grad-cam runs, on 224×224 photos with
    10–90% removed (GradCAM maps, both orders), random masks and single kept pixels, in 2–14
    iterations (benchmarks/bench_road.py, tests/evaluation/test_road.py).

    Args:
        images: ``B×C×H×W``, in any affine space (pixel values or normalized tensors).
        removed: ``B×H×W`` bool, True where a pixel is removed and imputed.
        noise: the noise's standard deviation in units of ``std`` (grad-cam: ``0.01`` in the model's
            normalized space).
        generator: for the noise; each image's ``C×H×W`` noise is one draw, in batch order, so a
            batch gives the same noise as its images one by one with the same generator; or one
            generator per image.
        std: ``C`` per-channel scale of the noise: the normalization's std for pixel-space
            ``images`` (so the noise is ``noise · ε`` after normalization); None: 1 (images that are
            already normalized, as grad-cam's).
    Raises:
        ValueError: bad shapes, or an image with every pixel removed (its system is singular: the
            imputation is only defined up to a constant).
        RuntimeError: some system still has ``‖r‖₂ > rtol · ‖b‖₂`` after ``max_iter`` iterations.
    """
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"removed must be B×H×W matching images {tuple(images.shape)}, got {tuple(removed.shape)}")
    if removed.dtype != torch.bool:
        raise ValueError(f"removed must be a bool tensor, got {removed.dtype}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise}")
    removed = removed.to(images.device)
    b, c, h, w = images.shape
    scale = torch.ones(c) if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if scale.shape != (c,):
        raise ValueError(f"std must have one value per channel ({c}), got {tuple(scale.shape)}")
    singular = removed.flatten(1).all(dim=1)
    if bool(singular.any()):
        raise ValueError(f"every pixel is removed in image(s) {singular.nonzero()[:, 0].tolist()}: "
                         "nothing is left to impute from")
    out = images.clone()
    if bool(removed.any()):
        system = _Multigrid(removed, torch.float64)
        x = _conjugate_gradient(system, system.rhs(images.to(torch.float64)), rtol, max_iter)
        out = torch.where(removed[:, None], x.to(images.dtype), images)
    if noise > 0:
        scale = (noise * scale.to(images.device, images.dtype)).view(1, c, 1, 1)
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * b
        if len(gens) != b:
            raise ValueError(f"got {len(gens)} generators for {b} images")
        eps = torch.stack([torch.randn((c, h, w), generator=g, dtype=images.dtype, device=images.device)
                           for g in gens])
        out = torch.where(removed[:, None], out + scale * eps, out)
    return out


def _conjugate_gradient(system: _Multigrid, rhs: Tensor, rtol: float, max_iter: int) -> Tensor:
    """Solve ``A x = rhs`` per ``(image, channel)`` by PCG; converged systems stop moving."""
    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(dim=(-2, -1), keepdim=True)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    goal = rtol**2 * dot(rhs, rhs)
    z = system.precondition(r)
    p = z
    rz = dot(r, z)
    for _ in range(max_iter):
        active = dot(r, r) > goal
        if not bool(active.any()):
            return x
        ap = system.apply(p)
        pap = dot(p, ap)
        alpha = torch.where(active, rz / torch.where(active, pap, 1), 0)
        x = x + alpha * p
        r = r - alpha * ap
        z = system.precondition(r)
        rz_new = dot(r, z)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1), 0)
        p = torch.where(active, z + beta * p, p)
        rz = torch.where(active, rz_new, rz)
    left = (dot(r, r) > goal).sum().item()
    if left:
        worst = (dot(r, r) / dot(rhs, rhs).clamp_min(1e-300)).max().sqrt().item()
        raise RuntimeError(f"imputation did not converge: {left} system(s) above rtol={rtol} after {max_iter} "
                           f"iterations (worst relative residual {worst:.1e})")
    return x


@dataclass(frozen=True)
class RoadResult:
    """ROAD probabilities of one batch.

    Attributes:
        morf, lerf: ``B×P`` softmax probabilities ``f_c`` of the target class after removing the
            most (MoRF) / least (LeRF) relevant pixels at each percentile and imputing them.
        percentiles: the ``P`` percentiles, in the columns' order.
        noise: the imputation noise, in the model's normalized units.
        seed: the seed of the noise's ``torch.Generator`` (on the images' device, so the same seed
            gives the same noise on the same device type only).
    """

    morf: Tensor
    lerf: Tensor
    percentiles: tuple[float, ...]
    noise: float
    seed: int


def road(model: PixelModel, images: Tensor, maps: Tensor, targets: Tensor | Sequence[int],
         percentiles: Sequence[float] = PERCENTILES, noise: float = 0.01, seed: int = 0,
         batch_size: int | None = None, precision: str = "fp32",
         image_seeds: Sequence[int] | None = None) -> RoadResult:
    """ROAD MoRF and LeRF probabilities for every image and percentile.

    All ``2·P·B`` removal masks (order-major, then percentile, then image) are imputed in pixel
    space (:func:`impute` with ``std = model.std``, at most :data:`IMPUTE_ELEMENTS` values per call)
    as the forward batches need them, and scored ``batch_size`` at a time by
    :func:`~unioncam.engine.batched_probs` (in IEEE fp32 unless ``precision`` says otherwise).
    Each mask's noise is one draw from its own ``torch.Generator(images.device)`` seeded with
    ``SeedSequence([seed, image_seeds[i], order, percentile index])``, so it depends on the image's
    seed and the mask only: not on ``batch_size`` nor on the other images or maps of the batch (two
    equal maps of one image get equal values). ``image_seeds`` None: the images' batch positions.

    Args:
        model: a :class:`~unioncam.models.base.PixelModel` (its ``std`` scales the noise).
        images: ``B×3×H×W`` in ``[0, 1]``. maps: ``B×H×W``, finite. targets: ``B`` classes.
        percentiles: each in ``(0, 100)``.
    Returns:
        :class:`RoadResult`. An entry is NaN where the threshold removes every pixel (at least ``p``%
        of the map equal to its minimum, e.g. a constant map): nothing is left to impute from, and
        grad-cam's ``spsolve`` gets a singular system there. Those masks are not scored.
    Raises:
        ValueError: bad shapes, non-finite maps, percentiles outside ``(0, 100)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    check_maps(images, maps)
    b, c, h, w = images.shape
    targets = torch.as_tensor(targets, device=images.device)
    if targets.shape != (b,):
        raise ValueError(f"targets must have one class per image ({b}), got shape {tuple(targets.shape)}")
    percentiles = tuple(float(p) for p in percentiles)
    if not percentiles or not all(0 < p < 100 for p in percentiles):
        raise ValueError(f"percentiles must be non-empty and each in (0, 100), got {percentiles}")
    n_p = len(percentiles)
    maps = maps.to(images.device)
    values = torch.stack([maps, 1 - maps]).reshape(2 * b, h * w)  # MoRF ranks L, LeRF ranks 1 − L
    thresholds = percentile(values, percentiles)  # 2B×P
    undefined = (values.min(dim=1, keepdim=True).values >= thresholds).view(2, b, n_p).permute(0, 2, 1).flatten()
    scored = (~undefined).nonzero()[:, 0]  # the masks in order-percentile-image order that leave a pixel
    own = list(range(b)) if image_seeds is None else [int(v) for v in image_seeds]
    if len(own) != b:
        raise ValueError(f"got {len(own)} image seeds for {b} images")

    def generator(o: int, k: int, i: int) -> torch.Generator:
        state = int(np.random.SeedSequence([seed, own[i] % 2**63, o, k]).generate_state(2, np.uint64)[0] >> 1)
        return torch.Generator(device=images.device).manual_seed(state)
    per_call = max(1, IMPUTE_ELEMENTS.get(images.device.type, IMPUTE_ELEMENTS["cuda"]) // (c * h * w))

    def inputs(sl: slice) -> Tensor:
        parts = []
        for start in range(sl.start, sl.stop, per_call):
            j = scored[start:min(start + per_call, sl.stop)]
            o, k, i = j // (n_p * b), (j // b) % n_p, j % b
            row = o * b + i
            removed = (values[row] >= thresholds[row, k][:, None]).view(-1, h, w)
            gens = [generator(*v) for v in zip(o.tolist(), k.tolist(), i.tolist(), strict=True)]
            parts.append(impute(images[i], removed, noise, gens, model.std.flatten()))
        return torch.cat(parts)

    size = batch_size or default_batch_size(model_device(model))
    probs = torch.full((2 * n_p * b,), float("nan"), device=images.device)
    probs[scored] = batched_probs(model, targets.repeat(2 * n_p)[scored], inputs, scored.numel(), size,
                                  resolve_precision(precision, images.device)).to(probs.dtype)
    probs = probs.view(2, n_p, b)
    return RoadResult(probs[0].T, probs[1].T, percentiles, float(noise), seed)


def road_drop(probs: Tensor, y: Tensor) -> Tensor:
    """``probs − Y`` per image and percentile (``B×P`` minus ``B``): what grad-cam's
    ``ROADMostRelevantFirst(p)`` / ``ROADLeastRelevantFirst(p)`` return (``return_diff=True``); the
    mean over the columns is its ``...Average``. ``Y = f_c(I0)``, e.g. from
    :func:`unioncam.evaluation.confidence`."""
    return probs - y[:, None]


def road_combined(result: RoadResult) -> Tensor:
    """grad-cam's ``ROADCombined``: ``(mean_p (LeRF_p − Y) − mean_p (MoRF_p − Y)) / 2`` per image,
    ``= mean_p (LeRF_p − MoRF_p) / 2`` (``Y`` cancels). Higher is better."""
    return (result.lerf - result.morf).mean(dim=1) / 2


def road_matrix(values: Any) -> np.ndarray:
    """A ``road_morf``/``road_lerf`` column (a pandas Series of lists) as an ``N×P`` array (NaN where
    undefined or not computed)."""
    lists = [v for v in values if not missing_values(v)]
    width = max((len(v) for v in lists), default=0)
    out = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        if not missing_values(v):
            out[i, :len(v)] = [np.nan if x is None else x for x in v]
    return out


def missing_values(value: Any) -> bool:
    """Whether a ``road_morf``/``road_lerf`` cell holds no values (null or empty: ROAD failed or was not run)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or len(value) == 0


def road_complete(rows: Any) -> np.ndarray:
    """Per row of ``rows`` (a DataFrame), whether every ROAD value is defined: each percentile of
    ``road_morf`` and of ``road_lerf`` finite (no null list, no null entry). The ROAD summary
    averages over these rows."""
    morf, lerf = road_matrix(rows["road_morf"]), road_matrix(rows["road_lerf"])
    return np.asarray(np.isfinite(morf).all(axis=1) & np.isfinite(lerf).all(axis=1) & (morf.shape[1] > 0)
                      & (lerf.shape[1] > 0), dtype=bool)


def road_means(values: Any) -> np.ndarray:
    """Per row, the mean over ROAD's percentiles (grad-cam's ``...Average``); NaN if none is defined."""
    m = road_matrix(values)
    with warnings.catch_warnings():  # a row with no defined percentile is NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(m, axis=1) if m.shape[1] else np.full(len(values), np.nan)


def key_seed(key: str) -> int:
    """The noise seed of a sample: from its key, so it does not depend on its batch or method."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class Road(Metric):
    """ROAD's MoRF and LeRF ``f_c`` per percentile of :data:`PERCENTILES` (:func:`road`), ``2 × P``
    imputed inputs per map, noise seeded by the sample's key. If the batch fails, map by map; a map
    that fails alone keeps its row with no ROAD values (null entries: a threshold that removed
    every pixel). Not in the default metrics (18 imputations per map)."""

    name = "road"
    title = "ROAD MoRF / LeRF at percentiles 10…90"
    columns: ClassVar[Mapping[str, ColumnType]] = {"road_morf": "list<float64>", "road_lerf": "list<float64>"}
    higher_is_better = True  # combined (LeRF − MoRF)/2
    default = False
    summary_columns: ClassVar[Mapping[str, Format]] = {"road_morf": "auc", "road_lerf": "auc", "road_combined": "auc",
                                                       "road_n": "int"}
    table = (TableColumn("ROAD MoRF ↓", "road_morf"), TableColumn("ROAD LeRF ↑", "road_lerf"),
             TableColumn("ROAD combined ↑", "road_combined"), TableColumn("ROAD n", "road_n", count=True))
    table_when_requested = True
    figure = "road.png"

    @classmethod
    def provenance(cls, requested: bool) -> dict[str, Any]:
        return {"road_percentiles": list(PERCENTILES) if requested else None}

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        """The definition, then per method how many error-free images the ROAD columns leave out
        (:func:`road_complete`) and why (every one of them when ROAD failed on all)."""
        ok = rows[rows["error"].isna()]
        none = ok["road_morf"].map(missing_values) | ok["road_lerf"].map(missing_values)
        complete = road_complete(ok)
        notes = ["ROAD (Rong et al., 2022; pytorch-grad-cam's ROADMostRelevantFirst/LeastRelevantFirst): the most "
                 "(MoRF) or least (LeRF) relevant 10…90% of the pixels (grad-cam's percentiles p = 90…10: the pixels "
                 "beyond the map's p-th percentile) replaced by noisy linear imputation; MoRF/LeRF are the mean f_c "
                 "over the percentiles, combined = (LeRF − MoRF)/2 (grad-cam's ROADCombined). All three average "
                 "over the same images (ROAD n, road_n in summary.csv): those with every ROAD value defined; an "
                 "image with a percentile whose threshold removed every pixel (NaN), or on which ROAD failed, is "
                 "left out of all three."]
        for method in methods:
            mine = ok["method"] == method
            failed, nan = int((mine & none).sum()), int((mine & ~none & ~complete).sum())
            if failed or nan:
                why = [f"{nan} where a ROAD threshold removed every pixel (NaN)"] if nan else []
                why += [f"{failed} where ROAD failed (no values)"] if failed else []
                notes.append(f"ROAD: {failed + nan} image(s) of method {method} left out (ROAD n = "
                             f"{int((mine & complete).sum())} of {int(mine.sum())}): {', '.join(why)}.")
        return notes

    @classmethod
    def curves(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[CurvePanel]:
        """MoRF and LeRF: per method the mean ``f_c`` against the share of pixels removed, ``100 − p`` at
        grad-cam's percentile ``p``, over the images of the ROAD columns (:func:`road_complete`)."""
        ok = rows[rows["error"].isna()]
        ok = ok[road_complete(ok)]
        if ok.empty:
            return []
        percentiles = list(facts.provenance.get("road_percentiles") or PERCENTILES)
        panels = []
        for col, title in (("road_morf", "ROAD MoRF: most relevant removed ↓"),
                           ("road_lerf", "ROAD LeRF: least relevant removed ↑")):
            lines = {}
            for method in methods:
                m = road_matrix(ok.loc[ok["method"] == method, col])
                if m.size:
                    lines[method] = ([100.0 - p for p in percentiles[:m.shape[1]]], m.mean(axis=0).tolist(), len(m))
            panels.append(CurvePanel(title, "pixels removed and imputed (%)", "f_c (probability)", lines))
        return panels

    def forwards_per_map(self) -> int:
        return 2 * len(PERCENTILES)

    def score(self, batch: MapBatch) -> list[Values]:
        c = self.context
        try:
            res = road(c.model, batch.images, batch.maps, batch.targets, batch_size=c.batch_size,  # type: ignore[arg-type]
                       precision=c.precision, image_seeds=[key_seed(k) for k in batch.keys])
        except Exception:
            if len(batch.keys) == 1:
                return [{}]
            return [v for j in range(len(batch.keys)) for v in self.score(MapBatch(
                batch.images[j:j + 1], batch.maps[j:j + 1], batch.targets[j:j + 1], batch.keys[j:j + 1],
                batch.boxes[j:j + 1]))]
        return [{"road_morf": [None if math.isnan(v) else v for v in morf],
                 "road_lerf": [None if math.isnan(v) else v for v in lerf]}
                for morf, lerf in zip(res.morf.tolist(), res.lerf.tolist(), strict=True)]

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        """MoRF and LeRF: the means over images of each image's mean over the percentiles, both over
        the same images, ``road_n`` of them (:func:`road_complete`: an image with a NaN percentile,
        or no values, is left out of all three); ``road_combined`` = (LeRF − MoRF)/2 of those
        means, which is the mean of each image's (LeRF − MoRF)/2."""
        complete = rows[road_complete(rows)]
        morf, lerf = (_mean(road_means(complete[c])) for c in ("road_morf", "road_lerf"))
        return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2, "road_n": len(complete)}


def _mean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
