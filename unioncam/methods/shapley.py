"""ShapleyCAM (arXiv:2501.06261, 2025: CAM methods read as Shapley-value estimates), as
pytorch-grad-cam 1.5.7's ``ShapleyCAM`` computes it.

A second-order estimate of each channel's Shapley value: the gradient corrected by half the
Hessian-vector product, ``w_k = mean_ij (g − ½ H·A)_kij`` with ``g = ∂S_c/∂A`` and
``(H·A)_kij = Σ_lab ∂²S_c/∂A_kij ∂A_lab · A_lab``; map ``ReLU(Σ_k w_k A_k)``.

``H·A`` costs a second backward through the part of the network after the target layer (the first
keeps its graph: :attr:`CAM.hessian_vector`); no extra forward. Where that part is piecewise linear
(ReLU, max pooling, average pooling, linear layers: EfficientNet-Lite0 after its last ReLU6, VGG16,
ResNet after ``layer4``) the Hessian is zero almost everywhere, and ShapleyCAM equals Grad-CAM.
"""

from __future__ import annotations

from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.gradient import weighted_sum


class ShapleyCAM(CAM):
    """ShapleyCAM: ``ReLU(Σ_k mean_ij(g − ½ H·A)_k A_k)``; one forward, two backwards."""

    name = "shapleycam"
    class_targets = False  # any callable target: only its gradient and Hessian are used
    hessian_vector = True

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None and len(grads) == 2  # g, then H·A
        grad, hvp = grads
        return weighted_sum((grad - 0.5 * hvp).mean(dim=(2, 3)), acts[0]), {}

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        raise NotImplementedError("ShapleyCAM needs the Hessian-vector product: see compute_layers")
