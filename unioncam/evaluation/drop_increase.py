"""Average Drop and Average Increase (Chattopadhay et al., 2018; REFERENCE.md, "Metrics").

Per-sample values are what the Parquet rows store (``y`` and ``o``); the report aggregates them
(:func:`unioncam.evaluation.summary.summarize`: mean and a seeded 95% bootstrap interval).

Conventions (of every metric module):
    * ``Y_i = f_c(I0)``, ``O_i = f_c(L ⊙ I0)``: softmax probabilities of the target class ``c``
      on the image and on the image masked by the method's normalized map ``L`` (pixel space).
    * ``protocol=`` (:mod:`unioncam.evaluation.protocols`): ``"reference"`` (the default: REFERENCE.md, the
      conventions above), or ``"rise"``, ``"pytorch-grad-cam"``, ``"torchcam"``: those libraries'
      conventions, for numbers comparable with theirs.
    * Boxes are ``[xmin, ymin, xmax, ymax]`` in the map's pixel coordinates, continuous: the pixel
      in column ``x``, row ``y`` covers ``[x, x+1) × [y, y+1)`` and lies in a box when its centre
      ``(x + 0.5, y + 0.5)`` does. So integer boxes cover columns ``xmin … xmax−1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from unioncam.engine import batched_probs, default_batch_size, model_device
from unioncam.evaluation.base import ColumnType, Format, MapBatch, Metric, ReportFacts, TableColumn, Values, check_maps
from unioncam.evaluation.protocols import Protocol, get_protocol
from unioncam.evaluation.summary import summarize
from unioncam.ops import resolve_precision


def confidence(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
               batch_size: int | None = None, precision: str = "fp32",
               protocol: str | Protocol = "reference") -> tuple[Tensor, Tensor]:
    """``(Y, O)`` with ``Y_i = f_c(I0_i)`` and ``O_i = f_c(L_i ⊙ I0_i)``, batched, in IEEE fp32 by
    default (so a method's ``precision`` changes its maps only). ``precision`` (``"fp16"``, ...) runs
    the metric forwards at reduced precision for speed on GPUs; the logits stay fp32 (the model's
    last ``Linear`` computes in fp32 under autocast). ``protocol`` (:mod:`unioncam.evaluation.protocols`) says
    where ``L`` multiplies: the pixels (``reference``) or the model's normalized input.

    Args:
        images: ``B×3×H×W`` in ``[0, 1]``. maps: ``B×H×W`` in ``[0, 1]``. targets: ``B`` classes.
    """
    check_maps(images, maps)
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
    (Chattopadhay et al., 2018). Other protocols: :meth:`unioncam.evaluation.protocols.Protocol.average_drop`
    (``pytorch-grad-cam``: ``100 · max(0, Y − O)``). Raises ``ValueError`` for ``Y ≤ 0`` or
    non-finite input."""
    _check_confidences(y, o)
    return get_protocol(protocol).average_drop(y, o)


def average_increase(y: Tensor, o: Tensor) -> Tensor:
    """Per-sample increase ``100 · 1[Y < O]`` in percent; its mean is the Average Increase."""
    _check_confidences(y, o)
    return 100.0 * (y < o).to(y.dtype)



class _Confidence(Metric):
    """``Y`` and ``O`` per map (:func:`confidence`): the columns Average Drop and Increase share."""

    columns: ClassVar[Mapping[str, ColumnType]] = {"y": "float64", "o": "float64"}
    by_protocol = True

    def forwards_per_map(self) -> int:
        return 2

    def score(self, batch: MapBatch) -> list[Values]:
        c = self.context
        y, o = confidence(c.model, batch.images, batch.maps, batch.targets, c.batch_size, c.precision, c.protocol)
        out: list[Values] = []
        for yj, oj in zip(y.tolist(), o.tolist(), strict=True):
            if not (math.isfinite(yj) and math.isfinite(oj)):
                out.append(f"non-finite confidence (Y={yj}, O={oj})")
            elif yj <= 0:
                out.append("Y = 0: the model gives the target class zero probability (Average Drop undefined)")
            else:
                out.append({"y": yj, "o": oj})
        return out

    @classmethod
    def derive(cls, rows: Any, protocol: Protocol) -> dict[str, Any]:
        y, o = rows["y"].astype(float).to_numpy(), rows["o"].astype(float).to_numpy()
        missing = np.isnan(y) | np.isnan(o)
        return {"drop": protocol.drop_array(y, o), "increase": np.where(missing, np.nan, 100.0 * (y < o))}

    @classmethod
    def _interval(cls, values: Any, name: str, prefix: str) -> dict[str, Any]:
        values = values.dropna()
        s = summarize(values.to_numpy())[0] if len(values) else None
        nan = float("nan")
        return {name: s.mean if s else nan, f"{prefix}_ci_low": s.ci_low if s else nan,
                f"{prefix}_ci_high": s.ci_high if s else nan}


class AverageDrop(_Confidence):
    """Average Drop: the mean over images of ``100 · max(0, Y − O) / Y`` (the protocol's drop)."""

    name = "ad"
    title = "Average Drop % (Y and O)"
    higher_is_better = False
    summary_columns: ClassVar[Mapping[str, Format]] = {"average_drop": "pct", "ad_ci_low": "pct", "ad_ci_high": "pct"}
    table = (TableColumn("Average Drop % ↓ [95% CI]", "average_drop", ("ad_ci_low", "ad_ci_high")),)
    distributions: ClassVar[Mapping[str, str]] = {"drop": "per-image drop (%)"}

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        return cls._interval(rows["drop"], "average_drop", "ad")

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        p = facts.protocol
        rule = ("100/N Σ max(0, Y−O)/Y" if p.drop == "relative" and not p.drop_eps else
                f"100/N Σ max(0, Y−O)/(Y + {p.drop_eps:g})" if p.drop == "relative" else
                "100/N Σ max(0, Y−O) (absolute)")
        return [f"Average Drop = {rule} (protocol {p.name}; see Metric protocol below); 95% percentile "
                "bootstrap CIs."]


class AverageIncrease(_Confidence):
    """Average Increase: the share of images (percent) with ``Y < O``."""

    name = "ai"
    title = "Average Increase % (Y and O)"
    higher_is_better = True
    summary_columns: ClassVar[Mapping[str, Format]] = {"average_increase": "pct", "ai_ci_low": "pct",
                                                       "ai_ci_high": "pct"}
    table = (TableColumn("Average Increase % ↑ [95% CI]", "average_increase", ("ai_ci_low", "ai_ci_high")),)

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        return cls._interval(rows["increase"], "average_increase", "ai")

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        return [f"Average Increase = 100/N Σ 1[Y<O] (protocol {facts.protocol.name}); 95% percentile bootstrap CIs."]
