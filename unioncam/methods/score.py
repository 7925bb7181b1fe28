"""Score-CAM (Wang et al., 2020) as REFERENCE.md defines it, batched across channels and images.

``H_k = norm(up(A_k))``, ``w_k = f_c(I0 ⊙ H_k) − f_c(Ib)``, map ``ReLU(Σ_k w_k A_k)``. Channels
whose activation map is constant get ``w_k = 0`` without a forward pass: ``norm`` sends them to
the all-zero mask, whose input is ``Ib`` itself, so their weight is exactly 0 either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unioncam.engine import masked_scores
from unioncam.methods.base import CAM, Details
from unioncam.methods.gradient import weighted_sum
from unioncam.ops import Precision, black_image_probs, is_constant, normalize, upsample


def score_weights(model: torch.nn.Module, images: Tensor, targets: Tensor, acts: Tensor,
                  batch_size: int, precision: Precision = "fp32",
                  skip_constant: bool = True) -> tuple[Tensor, Tensor]:
    """Score-CAM channel weights ``w_kb = f_c(I0_b ⊙ norm(up(A_bk))) − f_c(Ib)``.

    All (image, channel) pairs with a non-constant map are packed into forward batches of
    ``batch_size`` masked inputs, so images share batches and the upsampled masks of only one
    batch exist at a time. One host synchronization per call (the count of pairs).

    Returns:
        ``(w, forwards)``: weights ``B×K`` and masked forwards spent per image (``B``).
    """
    b, k = acts.shape[:2]
    size = (images.shape[-2], images.shape[-1])
    keep = ~is_constant(acts) if skip_constant else torch.ones(b, k, dtype=torch.bool, device=acts.device)
    pairs = keep.nonzero()  # N×2 of (image, channel)
    img_idx, ch_idx = pairs[:, 0], pairs[:, 1]

    def masks(sl: slice) -> Tensor:
        return normalize(upsample(acts[img_idx[sl], ch_idx[sl]], size))

    scores = masked_scores(model, images, targets, img_idx, masks, batch_size, precision)
    base = black_image_probs(model, images, precision)[targets]
    weights = torch.zeros(b, k, dtype=scores.dtype, device=acts.device)
    weights[img_idx, ch_idx] = scores - base[img_idx]
    return weights.to(acts.dtype), keep.sum(dim=1)


def region_map(model: torch.nn.Module, images: Tensor, targets: Tensor, acts: Tensor,
               batch_size: int, precision: Precision = "fp32",
               skip_constant: bool = True) -> tuple[Tensor, Tensor]:
    """Score-CAM's map at input size, normalized: ``norm(up(ReLU(Σ_k w_k A_k)))``, and forwards."""
    weights, forwards = score_weights(model, images, targets, acts, batch_size, precision, skip_constant)
    size = (images.shape[-2], images.shape[-1])
    return normalize(upsample(weighted_sum(weights, acts), size)), forwards


class ScoreCAM(CAM):
    """Score-CAM. Option ``skip_constant`` (default True) skips constant channels exactly."""

    name = "scorecam"
    family = "score"
    uses_gradients = False
    channel_forwards = True

    def __init__(self, *args: object, skip_constant: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.skip_constant = skip_constant

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        cam, forwards = region_map(self.model, images, targets, acts, self.batch_size, self.precision,
                                   self.skip_constant)
        return cam, {"forwards": forwards}
