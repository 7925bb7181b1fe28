"""One entry per method (Integrative CAM's compute_layers), and UnionCAM's region map is Score-CAM's."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch

import unioncam
from unioncam.methods.integrative import IntegrativeCAM
from unioncam.ops import normalize

REPO = Path(__file__).resolve().parents[2]
KIT_FOX = "n02119789"  # torchvision 278



# -- dead and misleading code ------------------------------------------------------------------
def test_integrativecam_compute_is_not_a_second_entry():
    model, x = ref.hand_model(), ref.hand_images(2)
    with IntegrativeCAM(model) as cam:
        cam(x)  # the real pipeline: compute_layers
        with pytest.raises(NotImplementedError, match="compute_layers"):
            cam.compute(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, 6, 6), None, torch.zeros(2, 3))


def test_region_map_is_scorecams_output_already_normalized():
    model, x = ref.hand_model(), ref.hand_images(3)
    union = unioncam.explain(model, x, "unioncam", batch_size=3)
    score = unioncam.explain(model, x, "scorecam", batch_size=3)
    region = union.details["region_map"]
    assert region.shape == x.shape[:1] + x.shape[2:]
    assert torch.equal(normalize(region), region)
    assert torch.equal(region, score.maps)
