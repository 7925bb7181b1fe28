"""``torchvision:<name>``: any classification model of ``torchvision.models`` (``resnet50``,
``convnext_tiny``, ``densenet121``, ``mobilenet_v3_large``, ``efficientnet_b0``, ``regnet_y_800mf``,
``inception_v3``, ``vit_b_16``, ...).

Preprocessing (mean, std, crop size, resize size) and class names come from the weights enum's
metadata (``get_model_weights(name).DEFAULT``), which is part of torchvision: nothing is fetched.
Weights come from ``weights=`` (a file or URI), else from torchvision's own cache (the torch hub
``checkpoints/`` folder) when the standard file is already there, else, only with
``allow_download=True``, downloaded into that cache by torchvision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from unioncam.models.base import (
    LoadedModel,
    Reshape,
    WeightsError,
    finish,
    last_spatial_layer,
    load_state_dict,
    state_sha256,
)
from unioncam.ops import nhwc_to_nchw, vit_reshape

# Built as the published weights expect: the Inception models normalize internally from ImageNet
# statistics (transform_input) and carry auxiliary heads in their state dicts.
_BUILD_OPTIONS: dict[str, dict[str, Any]] = {
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
}


def names() -> list[str]:
    """torchvision's classification model names."""
    return list(tvm.list_models(module=tvm))


def check(name: str) -> str:
    """``name`` if torchvision has that classification model, else a ValueError listing close names."""
    import difflib

    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"torchvision has no classification model {name!r}{hint}")
    return name


def default_layer(name: str, net: nn.Module, size: tuple[int, int]) -> tuple[str, Reshape | None]:
    """The usual CAM layer of a torchvision family (docs/models.md), else the last spatial
    activation found by a dry run (:func:`unioncam.models.base.last_spatial_layer`)."""
    family = name.split("_")[0].rstrip("0123456789")
    features = getattr(net, "features", None)
    if family in ("resnet", "resnext", "wide"):
        return "layer4", None
    if family == "densenet":
        return "features.relu5", None  # added by build(): the ReLU densenet applies after norm5
    if family in ("mobilenet", "efficientnet", "convnext", "mnasnet") and isinstance(features, nn.Sequential):
        return f"features.{len(features) - 1}", None
    if family == "regnet":
        return "trunk_output", None
    if family == "vgg" and isinstance(features, nn.Sequential):
        relus = [i for i, m in enumerate(features) if isinstance(m, nn.ReLU)]
        return f"features.{relus[-1]}", None
    if family == "inception":
        return "Mixed_7c", None
    if family == "vit":  # the class token dropped, the 14×14 patch tokens as a grid
        layers = net.get_submodule("encoder.layers")
        assert isinstance(layers, nn.Sequential)
        last = list(layers.named_children())[-1][0]  # torchvision names them encoder_layer_0, ...
        return f"encoder.layers.{last}.ln_1", vit_reshape(1)
    if family == "swin" and isinstance(features, nn.Sequential):  # stages output B×H×W×C
        return f"features.{len(features) - 1}", nhwc_to_nchw
    return last_spatial_layer(net, size), None


class _DenseNet(tvm.DenseNet):
    """torchvision's DenseNet whose final ReLU, applied functionally and in place after
    ``features.norm5``, is a module, ``features.relu5``: the ReLU'd final features can be hooked and
    no in-place op modifies what a hook captured. Same parameters, same outputs."""

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1))


def _hookable_densenet(net: nn.Module) -> None:
    assert isinstance(net, tvm.DenseNet)
    net.features.add_module("relu5", nn.ReLU())
    net.__class__ = _DenseNet


def build(name: str, weights: str | None, allow_download: bool) -> LoadedModel:
    """torchvision model ``name`` with its weights (module docstring). Raises :class:`WeightsError`."""
    check(name)
    default = tvm.get_model_weights(name).DEFAULT
    transform = default.transforms()
    size = (int(transform.crop_size[0]),) * 2
    classes = tuple(default.meta["categories"])
    net = tvm.get_model(name, weights=None, num_classes=len(classes), **_BUILD_OPTIONS.get(name, {}))
    if weights is not None:
        sha: str | None = load_state_dict(net, weights)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
        if cached.is_file():
            sha = load_state_dict(net, str(cached))
        elif allow_download:
            net.load_state_dict(default.get_state_dict(progress=False, check_hash=True))
            sha = state_sha256(net)
        else:
            raise WeightsError(f"no weights for torchvision:{name}: pass --weights PATH (a state dict), put "
                               f"torchvision's {cached.name} in {cached.parent}, or pass --allow-download "
                               "(torchvision downloads it into that cache); nothing is downloaded otherwise")
    if name.startswith("densenet"):
        _hookable_densenet(net)
    layer, reshape = default_layer(name, net, size)
    return finish(f"torchvision:{name}", net, transform.mean, transform.std, layer, size, classes, sha,
                  resize_size=int(transform.resize_size[0]), reshape=reshape)
