"""The energy-based pointing game (Wang et al., 2020, Score-CAM): the share of a map's energy inside
the object's boxes; box conventions in :mod:`unioncam.evaluation.drop_increase`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from unioncam.evaluation.base import ColumnType, Format, MapBatch, Metric, ReportFacts, TableColumn, Values, mean_of
from unioncam.ops import safe_divide


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



class EnergyPointingGame(Metric):
    """EPG per map of a sample with boxes (:func:`energy_pointing_game`); no forwards. For VOC the
    boxes are those of the sample's labelled class (an ImageNet model's target has no VOC boxes)."""

    name = "epg"
    title = "energy-based pointing game (samples with boxes)"
    columns: ClassVar[Mapping[str, ColumnType]] = {"epg": "float64"}
    higher_is_better = True
    needs_boxes = True
    summary_columns: ClassVar[Mapping[str, Format]] = {"epg": "auc", "n_epg": "int"}
    table = (TableColumn("EPG ↑", "epg"),)
    distributions: ClassVar[Mapping[str, str]] = {"epg": "energy pointing game ↑"}

    def forwards_per_map(self) -> int:
        return 0

    def score(self, batch: MapBatch) -> list[Values]:
        return [{"epg": float(energy_pointing_game(batch.maps[j:j + 1], [boxes])[0])} if boxes else {}
                for j, boxes in enumerate(batch.boxes)]

    @classmethod
    def summarize(cls, rows: Any) -> dict[str, Any]:
        return {"epg": mean_of(rows["epg"]), "n_epg": int(rows["epg"].notna().sum())}

    @classmethod
    def notes(cls, rows: Any, methods: list[str], facts: ReportFacts) -> list[str]:
        """Why EPG is empty or partial (nothing when every image has it)."""
        ok = rows[rows["error"].isna()]
        images, with_boxes = ok["key"].nunique(), ok.loc[ok["epg"].notna(), "key"].nunique()
        if not images:
            return []
        if with_boxes == 0:
            why = {"imagenet": "ImageNet shards have boxes only when converted with --boxes",
                   "voc": "VOC shards carry the boxes of each image's labelled objects; these samples have none"}.get(
                str(facts.provenance.get("dataset")), "their samples' .json has no \"boxes\"")
            if facts.requested is None:
                return [f"EPG: no values: no boxes in these shards ({why}), or epg was not requested."]
            return [f"EPG: no boxes in these shards ({why})."]
        if with_boxes < images:
            return [f"EPG: over the {with_boxes} of {images} images that have boxes (n_epg in summary.csv); "
                    "the others have none."]
        return []
