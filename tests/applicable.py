"""Which registered methods can explain a test model (``CAM.check_model``), and a tiny vision
transformer for the methods that explain transformers only (LeGrad): the registry-wide property tests
(hooks, training flags, batches) run each method on a model it applies to."""

from __future__ import annotations

import functools

import torch
from torch import nn

import unioncam
from unioncam.methods import METHODS, get_method
from unioncam.models import LoadedModel


@functools.cache
def _tiny_cnn() -> LoadedModel:
    return unioncam.load("tiny_cnn")


def methods_for_tiny_cnn() -> list[str]:
    """The registered methods whose ``check_model`` accepts ``tiny_cnn`` (all but the transformer-only ones)."""
    return methods_for(_tiny_cnn())


def methods_for(lm: LoadedModel) -> list[str]:
    """The registered methods whose ``check_model`` accepts ``lm``'s model and layer."""
    out = []
    for name in METHODS.names():
        try:
            get_method(name).check_model(lm.model, lm.target_layer, lm.input_size)
        except ValueError:
            continue
        out.append(name)
    return out


def transformer_only() -> list[str]:
    """The registered methods ``tiny_cnn`` is refused by: each is tested on :func:`tiny_vit` instead."""
    cnn = set(methods_for_tiny_cnn())
    return [m for m in METHODS.names() if m not in cnn]


def tiny_vit(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """torchvision's ``VisionTransformer`` at 32×32: 8×8 patches (a 4×4 grid and the class token), 3 blocks of
    2 heads, 16 dimensions, 7 classes, seeded random weights (the head too); target layer the last block's
    ``ln_1``."""
    from torchvision.models.vision_transformer import VisionTransformer

    from unioncam.ops import vit_reshape

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=7)
    nn.init.normal_(net.heads.head.weight, std=0.5)  # torchvision starts the head at zero: every gradient 0
    lm = unioncam.load(net, target_layer="encoder.layers.encoder_layer_2.ln_1", input_size=32,
                       reshape=vit_reshape(1))
    lm.model.to(dtype)
    return lm
