"""Any ``nn.Module`` classifier: ``unioncam.load(module, target_layer=..., mean=..., std=...,
input_size=..., class_names=...)``.

The module is wrapped as it is (not frozen, not copied): it must take a normalized ``B×3×H×W``
batch and return ``B×C`` logits. Unset options default to ImageNet's mean/std, 224×224, the last
spatial activation found by a dry run (logged), and ImageNet's class names for 1000 logits (else
``class_<i>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unioncam.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    Reshape,
    class_names_for,
    finish,
    last_spatial_layer,
)


def wrap(module: nn.Module, target_layer: str | None, size: tuple[int, int], mean: Sequence[float] | None,
         std: Sequence[float] | None, class_names: Sequence[str] | None, reshape: Reshape | None) -> LoadedModel:
    """``module`` as a :class:`LoadedModel` (module docstring)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if class_names is None:
        was = {m: m.training for m in module.modules()}
        try:
            module.eval()
            with torch.inference_mode():
                n = int(module(torch.zeros((1, 3, *size), device=device)).shape[-1])
        finally:
            for m, flag in was.items():
                m.training = flag
        class_names = class_names_for(n)
    layer = target_layer if target_layer is not None else last_spatial_layer(module, size)
    return finish(f"custom:{type(module).__name__}", module, mean or IMAGENET_MEAN, std or IMAGENET_STD, layer,
                  size, class_names, None, reshape=reshape, own=False)
