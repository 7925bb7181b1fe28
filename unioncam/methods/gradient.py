"""Gradient-based baselines (REFERENCE.md, "Baselines").

Notation: ``A`` activations ``B×K×h×w`` at the target layer, ``g = ∂S_c/∂A`` (logit gradient),
channel weights ``w`` of shape ``B×K``; a map is ``ReLU(Σ_k w_k A_k)`` unless stated.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.integrative import generalized_alpha
from unioncam.ops import safe_divide


def weighted_sum(weights: Tensor, acts: Tensor) -> Tensor:
    """``ReLU(Σ_k w_k A_k)``: ``B×K`` weights and ``B×K×h×w`` activations to ``B×h×w``."""
    return torch.einsum("bk,bkhw->bhw", weights, acts).clamp_min(0)


def gradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., 2017): ``w_k = mean_ij g_kij``."""
    return grads.mean(dim=(2, 3))


def gradcampp_alpha(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., 2018): ``α = g² / (2g² + Σ_ab A_kab g³)``, 0 where the
    denominator is 0. It is Integrative CAM's :func:`generalized_alpha` with both φ factors
    (``φ''`` and ``φ'''``) set to 1; multiplying by 1 is exact, so the two agree bit for bit."""
    ones = torch.ones(grads.shape[0], dtype=grads.dtype, device=grads.device)
    return generalized_alpha(acts, grads, ones, ones)


def gradcampp_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++: ``w_k = Σ_ij α_kij ReLU(g_kij)``."""
    return (gradcampp_alpha(acts, grads) * grads.clamp_min(0)).sum(dim=(2, 3))


def xgradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., 2020): ``w_k = Σ_ij (A_kij / Σ_ab A_kab) g_kij`` (0 where ``Σ A = 0``)."""
    return (safe_divide(acts, acts.sum(dim=(2, 3), keepdim=True)) * grads).sum(dim=(2, 3))


class _ChannelWeightCAM(CAM):
    """``ReLU(Σ_k w_k A_k)`` with ``w = weights(A, g)``; subclasses set ``weights``."""

    weights: ClassVar[staticmethod[[Tensor, Tensor], Tensor]]
    class_targets = False  # any callable target: only the gradient of its score is used

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return weighted_sum(type(self).weights(acts, grads), acts), {}


class GradCAM(_ChannelWeightCAM):
    """Grad-CAM: ``ReLU(Σ_k mean_ij(g_k) A_k)``."""

    name = "gradcam"
    weights = staticmethod(gradcam_weights)


class GradCAMPP(_ChannelWeightCAM):
    """Grad-CAM++: ``ReLU(Σ_k w_k A_k)`` with ``w_k = Σ_ij α_kij ReLU(g_kij)``."""

    name = "gradcampp"
    weights = staticmethod(gradcampp_weights)


class XGradCAM(_ChannelWeightCAM):
    """XGrad-CAM: ``ReLU(Σ_k w_k A_k)`` with ``w_k = Σ_ij (A_kij / Σ_ab A_kab) g_kij``."""

    name = "xgradcam"
    weights = staticmethod(xgradcam_weights)
    same_as = ("gradcam", "at a target layer followed directly by global average pooling and a linear classifier, "
                          "the gradient is constant over each channel, so XGrad-CAM's weights Σ(∂y/∂A·A)/ΣA equal "
                          "Grad-CAM's mean gradient and the maps are the same")


class LayerCAM(CAM):
    """LayerCAM (Jiang et al., 2021): ``ReLU(Σ_k ReLU(g_k) ⊙ A_k)``."""

    name = "layercam"
    class_targets = False

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return (grads.clamp_min(0) * acts).sum(dim=1).clamp_min(0), {}


class HiResCAM(CAM):
    """HiResCAM (Draelos & Carin, 2020): ``ReLU(Σ_k g_k ⊙ A_k)``: the gradient multiplies the
    activations element-wise before the channel sum, so the map is the class score's first-order
    share at each position (= pytorch-grad-cam 1.5.7 ``HiResCAM``)."""

    name = "hirescam"
    class_targets = False

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return (grads * acts).sum(dim=1).clamp_min(0), {}


class GradCAMElementWise(CAM):
    """Grad-CAM element-wise (pytorch-grad-cam 1.5.7 ``GradCAMElementWise``): ``ReLU(Σ_k ReLU(g_k ⊙ A_k))``,
    HiResCAM with the ReLU taken per channel before the sum (the outer ReLU changes nothing)."""

    name = "gradcamelementwise"
    class_targets = False

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return (grads * acts).clamp_min(0).sum(dim=1), {}
