"""Eigen-CAM (Muhammad & Yeasin, 2020) and Eigen-Grad-CAM, as pytorch-grad-cam 1.5.7 computes them.

The map is the projection of the centered ``hw×K`` matrix of activations (Eigen-Grad-CAM: of
``g ⊙ A``) on its first right singular vector, then ReLU: ``ReLU((X − mean_rows X) v₁)``.

Decision (sign convention): a singular vector's sign is arbitrary, and the map depends on it (the
ReLU keeps one side). pytorch-grad-cam keeps whatever LAPACK's ``gesdd`` returns through
``numpy.linalg.svd(full_matrices=True)``; ``torch.linalg.svd`` on the same matrix returns the other
sign for a large share of real activation matrices (measured: 58% of random 196×512 ones), and
cuSOLVER's choice differs again. So the small ``hw×K`` decomposition runs in NumPy on the CPU, in the
activations' dtype, exactly as pytorch-grad-cam does: the same sign as the reference, and the same
map on every device. It is one SVD of a ``49×1280`` matrix per image for EfficientNet-Lite0
(milliseconds), not a hot path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details


def first_component(x: Tensor) -> Tensor:
    """``B×K×h×w`` to ``B×h×w``: each image's centered ``hw×K`` matrix projected on its first right
    singular vector (NaN read as 0), with LAPACK's sign (see the module docstring)."""
    batch = np.nan_to_num(x.detach().cpu().numpy(), nan=0.0)
    out = np.empty((x.shape[0], *x.shape[2:]), dtype=batch.dtype)
    for i, a in enumerate(batch):
        rows = a.reshape(a.shape[0], -1).transpose()
        rows = rows - rows.mean(axis=0)
        _, _, vt = np.linalg.svd(rows, full_matrices=True)
        out[i] = (rows @ vt[0, :]).reshape(a.shape[1:])
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


class EigenCAM(CAM):
    """Eigen-CAM: ``ReLU(first principal component of A)``; class-agnostic (no gradient, the target
    is reported but does not change the map)."""

    name = "eigencam"
    family = "activation"
    uses_gradients = False
    class_targets = False

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        return first_component(acts).clamp_min(0), {}


class EigenGradCAM(CAM):
    """Eigen-Grad-CAM (pytorch-grad-cam): ``ReLU(first principal component of g ⊙ A)``."""

    name = "eigengradcam"
    class_targets = False

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return first_component(grads * acts).clamp_min(0), {}
