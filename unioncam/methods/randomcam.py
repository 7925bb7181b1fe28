"""A seeded random map: the floor every metric should beat.

Definition (pytorch-grad-cam 1.5.7 ``RandomCAM``): channel weights drawn uniformly from ``[-1, 1)``,
map ``ReLU(Σ_k w_k A_k)``. Decision: the weights of every image are drawn from a NumPy
``RandomState(seed)`` of their own (not one stream for the batch), so an image gets the same map
whatever its batch, batch size or device, and a one-image batch equals pytorch-grad-cam's
``RandomCAM`` after ``np.random.seed(seed)`` (it draws from NumPy's global ``RandomState``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.gradient import weighted_sum


def random_weights(seed: int, batch: int, channels: int) -> Tensor:
    """``batch×channels`` weights in ``[-1, 1)``: every row is ``RandomState(seed).uniform(-1, 1, channels)``."""
    row = np.random.RandomState(seed).uniform(-1, 1, size=(1, channels))
    return torch.from_numpy(row).expand(batch, channels)


class RandomCAM(CAM):
    """Random channel weights: ``ReLU(Σ_k w_k A_k)``, ``w_k ~ U[-1, 1)`` from ``seed`` (default 0)."""

    name = "random"
    family = "activation"
    uses_gradients = False
    class_targets = False
    seeded = True

    def __init__(self, *args: object, seed: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seed = int(seed)

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        w = random_weights(self.seed, acts.shape[0], acts.shape[1]).to(device=acts.device, dtype=acts.dtype)
        return weighted_sum(w, acts), {"seed": [self.seed] * acts.shape[0]}
