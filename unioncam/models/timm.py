"""``timm:<name>``: any model ``timm.create_model`` builds (``convnext_tiny``, ``resnet50``,
``efficientnet_b0``, ``vit_tiny_patch16_224``, ``deit_small_patch16_224``, ``swin_tiny_patch4_window7_224``,
...). timm is an optional extra: ``pip install 'unioncam[models]'``.

Preprocessing comes from the model's ``pretrained_cfg`` (mean, std, input size, crop_pct), which
timm knows without fetching anything. Weights come from ``weights=`` (a ``.pth``/``.bin`` state dict
or a ``.safetensors`` file, local or a URI), or, only with ``allow_download=True``, from timm's own
download (the Hugging Face hub cache). The default target layer is ``feature_info[-1]`` for CNNs;
ViT/DeiT explain the last block's ``norm1`` with the class/distillation tokens dropped and the
patch tokens as a grid, Swin the last block's ``norm2`` (its flattened tokens as a grid).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from unioncam.models.base import (
    LoadedModel,
    Reshape,
    WeightsError,
    class_names_for,
    finish,
    last_spatial_layer,
    load_state_dict,
    state_sha256,
)
from unioncam.ops import vit_reshape


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError("timm: models need the timm package: pip install 'unioncam[models]'") from None
    return timm


def check(name: str) -> str:
    """``name`` if timm can build it, else a ValueError listing close names."""
    import difflib

    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"timm has no model {name!r}{hint}")
    return name


def default_layer(net: nn.Module, size: tuple[int, int]) -> tuple[str, Reshape | None]:
    """The target layer (and token reshape) for a timm model; see the module docstring."""
    blocks = getattr(net, "blocks", None)
    prefix = getattr(net, "num_prefix_tokens", None)
    if isinstance(prefix, int) and isinstance(blocks, nn.Sequential):  # ViT, DeiT, ...
        return f"blocks.{len(blocks) - 1}.norm1", vit_reshape(prefix)
    layers = getattr(net, "layers", None)
    if type(net).__name__.startswith("SwinTransformer") and isinstance(layers, nn.Sequential):
        last = layers[-1].get_submodule("blocks")
        assert isinstance(last, nn.Sequential)
        return f"layers.{len(layers) - 1}.blocks.{len(last) - 1}.norm2", vit_reshape(0)  # flattened tokens
    info = getattr(net, "feature_info", None)
    if isinstance(info, list) and info:
        module = str(info[-1].get("module", ""))
        for candidate in (module, module.replace("_", ".")):
            if candidate and _has(net, candidate):
                return candidate, None
    return last_spatial_layer(net, size), None


def _has(net: nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
        return True
    except AttributeError:
        return False


def build(name: str, weights: str | None, allow_download: bool) -> LoadedModel:
    """timm model ``name`` with its weights (module docstring). Raises :class:`WeightsError`."""
    timm = _timm()
    check(name)
    if weights is None and not allow_download:
        raise WeightsError(f"no weights for timm:{name}: pass --weights PATH (a state dict or .safetensors "
                           "file), or --allow-download (timm downloads them into its cache); nothing is "
                           "downloaded otherwise")
    net = timm.create_model(name, pretrained=weights is None and allow_download)
    sha = load_state_dict(net, weights) if weights is not None else state_sha256(net)
    cfg = net.pretrained_cfg
    size = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    crop = float(cfg.get("crop_pct") or 1.0)
    layer, reshape = default_layer(net, size)
    return finish(f"timm:{name}", net, cfg["mean"], cfg["std"], layer, size,
                  class_names_for(int(net.num_classes)), sha, resize_size=math.floor(size[0] / crop),
                  reshape=reshape)
