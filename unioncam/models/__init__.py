"""Model zoo: classifiers wrapped to take pixel-space input in ``[0, 1]``.

``load(name_or_module, weights=None, ...)`` returns a :class:`LoadedModel`: a :class:`PixelModel`
(normalization inside ``forward``), its default target layer, input size, class names and
preprocessing. Names:

- ``vgg16``, ``efficientnet_lite0``, ``tiny_cnn``: built in (:mod:`unioncam.models.builtin`);
- ``torchvision:<name>``: any torchvision classification model (:mod:`unioncam.models.torchvision`);
- ``timm:<name>``: any timm model, ViT/DeiT/Swin included (:mod:`unioncam.models.timm`; the
  ``models`` extra);
- an ``nn.Module``: any classifier, with ``target_layer``/``mean``/``std``/``input_size``/
  ``class_names`` (:mod:`unioncam.models.custom`).

Offline by default: weights come from a file or URI (``weights=``, read with
``weights_only=True``, or safetensors), a package that ships them, or a library cache that already
holds them. Only ``allow_download=True`` lets torchvision or timm download into their own caches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from unioncam.models import builtin, custom
from unioncam.models import timm as timm_family
from unioncam.models import torchvision as torchvision_family
from unioncam.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FP32Linear,
    LoadedModel,
    PixelModel,
    Reshape,
    WeightsError,
    compiled_graphs,
    imagenet_classes,
    last_spatial_layer,
    load_state_dict,
    read_state_dict,
)
from unioncam.models.builtin import VGG16_FILE, TinyCNN
from unioncam.registry import Registry

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "VGG16_FILE", "FP32Linear", "LoadedModel", "PixelModel",
           "TinyCNN", "WeightsError", "canonical", "compiled_graphs", "imagenet_classes", "last_spatial_layer", "load",
           "load_state_dict", "names", "read_state_dict"]

FAMILIES = ("torchvision", "timm")
MODELS: Registry[object] = Registry("model")  # the built-in names (families are prefixes)
for _name in builtin.BUILTIN:
    MODELS.add(_name, builtin.BUILTIN[_name])


def names() -> list[str]:
    """What ``--model`` takes, for help texts."""
    return [*MODELS.names(), "torchvision:NAME", "timm:NAME"]


def canonical(name: str) -> str:
    """The canonical spelling of a model name (``torchvision:resnet50``, ``vgg16``), checked without
    building the model. Raises ValueError (:class:`unioncam.registry.UnknownNameError` for built-in
    names) naming the valid choices."""
    family, sep, rest = name.strip().partition(":")
    if not sep:
        return MODELS.canonical(name)
    family = family.lower()
    if family == "torchvision":
        return f"torchvision:{torchvision_family.check(rest.strip())}"
    if family == "timm":
        return f"timm:{timm_family.check(rest.strip())}"
    raise ValueError(f"unknown model family {family!r} in {name!r}; use torchvision:NAME, timm:NAME or one of "
                     f"{', '.join(MODELS.names())}")


def load(model: str | nn.Module, weights: str | os.PathLike[str] | None = None, *,
         target_layer: str | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
         input_size: int | tuple[int, int] | None = None, class_names: Sequence[str] | None = None,
         reshape: Reshape | None = None, allow_download: bool = False, channels_last: bool = False,
         fuse: bool = False, compile: bool = False) -> LoadedModel:
    """Build model ``model`` (a name, see the module docstring, or an ``nn.Module``) with its weights.

    Args:
        weights: a state-dict file or URI (``.pth``, ``.bin``, ``.safetensors``; nested under
            ``state_dict``/``model`` and ``module.`` prefixes are accepted). Not for modules.
        target_layer, mean, std, input_size, class_names, reshape: override the family's defaults
            (``input_size`` an int means square).
        allow_download: let torchvision/timm download missing weights into their caches.
        channels_last, fuse, compile: :class:`PixelModel`'s speed options (``fuse``: grad-free forwards
            through a copy with BatchNorm folded into the convolutions, :mod:`unioncam.models.fused`).
    Raises:
        WeightsError: no weights (and no download allowed), or a bad weights file.
        ValueError: an unknown name or layer.
    """
    size = None if input_size is None else (input_size, input_size) if isinstance(input_size, int) \
        else (int(input_size[0]), int(input_size[1]))
    path = None if weights is None else os.fspath(weights)
    if isinstance(model, nn.Module):
        if path is not None:
            load_state_dict(model, path)
        loaded = custom.wrap(model, target_layer, size or (224, 224), mean, std, class_names, reshape)
    else:
        name = canonical(model)
        family, _, rest = name.partition(":")
        if family == "torchvision":
            loaded = torchvision_family.build(rest, path, allow_download)
        elif family == "timm":
            loaded = timm_family.build(rest, path, allow_download)
        else:
            loaded = builtin.BUILTIN[name](path)
        loaded = _override(loaded, target_layer, size, mean, std, class_names, reshape)
    if channels_last:
        loaded.model.channels_last()
    if fuse:
        loaded.model.fuse_inference()
    if compile:
        loaded.model.compile_inference()
    return loaded


def _override(loaded: LoadedModel, target_layer: str | None, size: tuple[int, int] | None,
              mean: Sequence[float] | None, std: Sequence[float] | None, class_names: Sequence[str] | None,
              reshape: Reshape | None) -> LoadedModel:
    """``loaded`` with the caller's preprocessing, layer or names instead of the family's."""
    model = loaded.model
    if mean is not None or std is not None:
        model = PixelModel(model.net, mean or loaded.mean, std or loaded.std, model.target_layer,
                           model.reshape_transform).eval()
    if target_layer is not None:
        try:
            model.net.get_submodule(target_layer)  # fails now, naming the layer, not at the first call
        except AttributeError:
            raise ValueError(f"no layer {target_layer!r} in {loaded.name}") from None
        model.target_layer = target_layer
    if reshape is not None:
        model.reshape_transform = reshape
    if class_names is not None and len(class_names) != len(loaded.class_names):
        raise ValueError(f"{len(class_names)} class names for a model with {len(loaded.class_names)} logits")
    resize = loaded.resize_size  # the family's resize-then-crop ratio, kept for another input size
    if size is not None and resize is not None:
        resize = round(resize * size[0] / loaded.input_size[0])
    return replace(loaded, model=model, target_layer=target_layer or loaded.target_layer,
                   input_size=size or loaded.input_size, class_names=tuple(class_names or loaded.class_names),
                   mean=tuple(mean or loaded.mean), std=tuple(std or loaded.std), resize_size=resize)
