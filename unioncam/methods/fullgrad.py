"""FullGrad (Srinivas & Fleuret, NeurIPS 2019), as pytorch-grad-cam 1.5.7's ``FullGrad`` computes it.

``FullGrad = Σ_c ψ(|x ⊙ ∂S/∂x|_c) + Σ_l Σ_k ψ(up(|b_lk · ∂S/∂z_lk|))`` with ``ψ`` the per-map
min-max normalization ``(m − min) / (max − min + 10⁻⁷)`` (pytorch-grad-cam's ``scale_cam_image``,
its 10⁻⁷ kept so that nearly constant maps weigh what they weigh there), ``x`` the input (pixel space
here: the model normalizes inside), ``z_l`` the output of every ``nn.Conv2d`` and ``nn.BatchNorm2d``
with a bias (exact type, as pytorch-grad-cam selects them) and ``b_l`` its bias, for a batch norm the
effective one ``β − γ μ / √(σ² + ε)``. One forward and one backward.

Decisions: the model's target layer is not used (FullGrad reads every bias layer), so an explicit
``target_layer`` is refused rather than ignored; a model with no bias layer is refused
(:meth:`FullGrad.check_model`). Each layer's channel maps are normalized at the layer's resolution
and summed there, then upsampled once: the same as upsampling each (bilinear interpolation is
linear), with one upsampling per layer instead of one per channel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details, model_name
from unioncam.ops import min_max_eps, upsample

SCALE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Conv2d`` / ``nn.BatchNorm2d`` (exact types) with a bias, in module order."""
    return [m for m in model.modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d) and m.bias is not None]


def layer_bias(layer: nn.Module) -> Tensor:
    """The bias a layer adds to each output channel; a batch norm's in eval mode: ``β − γ μ / √(σ² + ε)``."""
    if isinstance(layer, nn.BatchNorm2d):
        assert layer.running_mean is not None and layer.running_var is not None
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps) if layer.weight is not None else \
            1 / torch.sqrt(layer.running_var + layer.eps)
        return (layer.bias - layer.running_mean * scale).detach()
    assert isinstance(layer.bias, Tensor)
    return layer.bias.detach()


class FullGrad(CAM):
    """FullGrad: input-gradient ⊙ input plus every bias-gradient map, each normalized, summed."""

    name = "fullgrad"
    input_gradient = True

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None, **kwargs: object) -> None:
        if target_layer is not None:
            shown = target_layer if isinstance(target_layer, str) else type(target_layer).__name__
            raise ValueError(f"fullgrad reads every conv and batch-norm bias: it takes no target_layer (got {shown!r})")
        super().__init__(model, None, **kwargs)  # type: ignore[arg-type]
        self.reshape = None  # bias layers are B×K×h×w whatever the model's target layer is

    @classmethod
    def check_model(cls, model: nn.Module, target_layer: str | nn.Module | None = None,
                    input_size: tuple[int, int] | None = None) -> None:
        if not bias_layers(model):
            raise ValueError(f"fullgrad: model {model_name(model)} has no Conv2d or BatchNorm2d layer with a bias; "
                             "FullGrad sums the bias gradients")

    def _resolve_layers(self, target_layer: str | nn.Module | None) -> list[nn.Module]:
        type(self).check_model(self.model)
        return bias_layers(self.model)

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None and len(grads) == len(acts) + 1
        size = (images.shape[-2], images.shape[-1])
        total = min_max_eps((grads[-1] * images).abs(), SCALE_EPS).sum(dim=1)
        for layer, grad in zip(self.layers, grads[:-1], strict=True):
            bias = layer_bias(layer).to(grad.dtype)[None, :, None, None]
            total = total + upsample(min_max_eps((bias * grad).abs(), SCALE_EPS).sum(dim=1), size)
        return total, {}

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        raise NotImplementedError("FullGrad reads several layers: see compute_layers")
