"""The engine's predicted-class forward (unioncam.engine.predict)."""

from __future__ import annotations

from pathlib import Path

import reference as ref
import torch

import unioncam
from unioncam.engine import predict

REPO = Path(__file__).resolve().parents[1]
KIT_FOX = "n02119789"  # torchvision 278



# -- the predicted-class forward ----------------------------------------------------------------
def test_predict_gives_the_argmax_as_ordinary_targets():
    model, x = ref.hand_model(), ref.hand_images(3)
    classes, logits = predict(model, x)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(logits, expected) and torch.equal(classes, expected.argmax(dim=1))
    assert not classes.is_inference()  # usable as targets by the methods' backward
    explained = unioncam.explain(model, x, "gradcam", targets=classes)
    assert torch.equal(explained.maps, unioncam.explain(model, x, "gradcam").maps)
