"""Insertion and deletion AUCs (Petsiuk et al., 2018, RISE), by the protocol's recipe
(:class:`unioncam.evaluation.protocols.Curves`); conventions in :mod:`unioncam.evaluation.drop_increase`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unioncam.engine import batched_probs, default_batch_size, model_device
from unioncam.evaluation.base import ColumnType, Format, MapBatch, Metric, TableColumn, Values, check_maps, mean_of
from unioncam.evaluation.protocols import (
    Protocol,
    blur,
    curve_auc,
    curve_counts,
    get_protocol,
    saliency_ranks,
)
from unioncam.ops import resolve_precision


def gaussian_blur(images: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur, an ``11``-tap sampled Gaussian of ``σ = 5`` px (normalized to sum 1)
    with reflect padding: the insertion baseline of REFERENCE.md (the ``reference`` protocol).

    Only the *parameters* (11 px, σ = 5) are RISE's. RISE's evaluation code builds its kernel with
    ``gkern(11, 5)``, a Gaussian-filtered point (nearly flat: centre/corner ratio 1.14), and pads with
    zeros, so its blurred baseline and its insertion AUCs differ from ours (issue 19 measured up to
    0.04 on EfficientNet-Lite0); the ``rise`` protocol (:mod:`unioncam.evaluation.protocols`) uses RISE's."""
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
    (:class:`unioncam.evaluation.protocols.Curves`; ``steps`` None: the protocol's, 224 for ``reference``).

    ``reference``: pixels are ranked by the map (descending; ties by raster order). At step
    ``s = 0 … steps`` the first ``round(s · HW / steps)`` pixels are revealed on the blurred image
    (insertion) or set to black (deletion); ``f_c`` is taken after each step and the AUC is the
    trapezoid rule over the fraction revealed. Other protocols change the space the pixels are
    replaced in, the baselines, the step rule, the tie order and the AUC rule. All perturbed inputs
    (``2·B`` curves) run in batches of ``batch_size``, in IEEE fp32 unless ``precision`` says
    otherwise (as :func:`confidence`).
    """
    check_maps(images, maps)
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



class InsertionDeletion(Metric):
    """Insertion and deletion AUC per map (:func:`insertion_deletion`), ``2 ×`` the curve's points
    masked inputs per map."""

    name = "insdel"
    title = "insertion / deletion AUC"
    columns: ClassVar[Mapping[str, ColumnType]] = {"insertion_auc": "float64", "deletion_auc": "float64"}
    higher_is_better = True  # insertion; deletion is better lower (the table's arrows say so)
    by_protocol = True
    summary_columns: ClassVar[Mapping[str, Format]] = {"insertion_auc": "auc", "deletion_auc": "auc"}
    table = (TableColumn("Insertion ↑", "insertion_auc"), TableColumn("Deletion ↓", "deletion_auc"))
    distributions: ClassVar[Mapping[str, str]] = {"insertion_auc": "insertion AUC ↑", "deletion_auc": "deletion AUC ↓"}

    @classmethod
    def unavailable(cls, protocol: Protocol) -> str | None:
        return None if protocol.curves is not None else f"protocol {protocol.name} defines no insertion/deletion " \
            f"({protocol.sources})"

    def forwards_per_map(self) -> int:
        c = self.context
        curves = c.protocol.curves
        if curves is None:
            return 0
        steps = c.insdel_steps or curves.steps
        return 2 * curve_counts(c.size[0] * c.size[1], steps, curves.step_rule).numel()

    def score(self, batch: MapBatch) -> list[Values]:
        c = self.context
        ins, dele = insertion_deletion(c.model, batch.images, batch.maps, batch.targets, c.insdel_steps,
                                       c.batch_size, c.precision, c.protocol)
        return [{"insertion_auc": a, "deletion_auc": d} for a, d in zip(ins.tolist(), dele.tolist(), strict=True)]

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        return {"insertion_auc": mean_of(rows["insertion_auc"]), "deletion_auc": mean_of(rows["deletion_auc"])}
