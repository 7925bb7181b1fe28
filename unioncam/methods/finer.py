"""Finer-CAM ("Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation",
arXiv:2501.11309, 2025), as pytorch-grad-cam 1.5.7's ``FinerCAM`` computes it with its default base method,
Grad-CAM.

Grad-CAM of a contrastive score instead of the class logit: with ``z`` the logits, ``c`` the target
class, ``p = softmax(z)`` and ``d_1, d_2, d_3`` the classes whose logits are nearest ``z_c`` (ranks
1, 2, 3 of ``|z − z_c|``, ``c`` itself being rank 0),

``F = Σ_j p_{d_j} (z_c − α z_{d_j}) / (Σ_j p_{d_j} + 10⁻⁹)`` (``α = 1``),

differentiated through ``p`` too (pytorch-grad-cam's ``FinerWeightedTarget``); map
``ReLU(Σ_k mean_ij(∂F/∂A_k) A_k)``. One forward and one backward.

Decisions:

* The target class (``targets=[c]`` or the predicted class) plays the part of pytorch-grad-cam's
  ``target_idx``; a callable target must name its class (``category``), whose comparison classes are
  then chosen the same way (pytorch-grad-cam would use the callable as the score, which makes a
  ``ClassifierOutputTarget`` plain Grad-CAM).
* ``comparison_ranks`` is pytorch-grad-cam's ``comparison_categories`` (default ``(1, 2, 3)``),
  ranks past the number of classes dropped as there. Ranks are taken by a stable sort with the target
  first, so equal distances keep class order (NumPy's default sort does not promise an order for ties).
* TorchCAM 0.5.0's ``FinerCAM`` differs: its score is ``z_c − γ · mean_j z_{d_j}`` with ``γ = 0.6`` and
  no softmax weights. We follow pytorch-grad-cam, as issue 26 asks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.gradient import gradcam_weights, weighted_sum
from unioncam.methods.targets import Target

FINER_EPS = 1e-9  # pytorch-grad-cam's FinerWeightedTarget


def comparison_classes(logits: Tensor, targets: Tensor, ranks: Sequence[int]) -> Tensor:
    """``B×R``: for each image the classes at ``ranks`` of the distance ``|z − z_c|`` (rank 0: ``c``)."""
    distance = (logits - logits.gather(1, targets[:, None])).abs()
    distance = distance.scatter(1, targets[:, None], -1.0)  # the target ranks first, whatever the ties
    order = torch.sort(distance, dim=1, stable=True).indices
    return order[:, list(ranks)]


def finer_score(logits: Tensor, targets: Tensor, ranks: Sequence[int], alpha: float) -> Tensor:
    """``F`` per image (``B``), differentiable in the logits (through the softmax weights too)."""
    others = comparison_classes(logits.detach(), targets, ranks)
    probs = logits.softmax(dim=-1)
    main = logits.gather(1, targets[:, None])
    weights = probs.gather(1, others)
    numerator = (weights * (main - alpha * logits.gather(1, others))).sum(dim=1)
    return numerator / (weights.sum(dim=1) + FINER_EPS)


class FinerCAM(CAM):
    """Finer-CAM: Grad-CAM of ``F`` (see the module docstring). Options ``alpha`` (1.0),
    ``comparison_ranks`` ((1, 2, 3))."""

    name = "finercam"

    def __init__(self, *args: object, alpha: float = 1.0, comparison_ranks: Sequence[int] = (1, 2, 3),
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not comparison_ranks or any(int(r) < 1 for r in comparison_ranks):
            raise ValueError(f"{self.name}: comparison_ranks must be ranks >= 1, got {list(comparison_ranks)}")
        self.alpha = float(alpha)
        self.ranks = tuple(int(r) for r in comparison_ranks)

    def class_score(self, logits: Tensor, targets: Tensor, scorers: Sequence[Target] | None) -> Tensor:
        ranks = [r for r in self.ranks if r < logits.shape[1]]
        if not ranks:
            raise ValueError(f"{self.name}: the model has {logits.shape[1]} class(es); Finer-CAM compares the "
                             f"target with the classes at ranks {list(self.ranks)} of logit distance")
        return finer_score(logits, targets, ranks, self.alpha).sum()

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        return weighted_sum(gradcam_weights(acts, grads), acts), {}
