"""Ablation-CAM (Ramaswamy & Desai, WACV 2020), as pytorch-grad-cam 1.5.7's ``AblationCAM`` computes it,
with the ablated forwards of all images and channels packed into shared batches (as Score-CAM's).

For each channel ``k``: ``w_k = (S_c − S_c^{(k)}) / S_c``, with ``S_c`` the class logit and
``S_c^{(k)}`` the logit when channel ``k`` of the target layer's output is replaced by the ablation
value; map ``ReLU(Σ_k w_k A_k)``. The ablation value is pytorch-grad-cam's: 0 when the image's
smallest activation at the layer is 0 (after a ReLU), else that minimum − 10⁷.

Decisions:

* Channels already equal to the ablation value everywhere (a dead ReLU channel) are not forwarded:
  replacing them changes nothing, so ``S_c^{(k)} = S_c`` and ``w_k = 0`` exactly (pytorch-grad-cam
  forwards them and gets the same up to rounding). Every other channel costs one forward.
* The ablated layer's output is replaced by a forward hook during those forwards only (pytorch-grad-cam
  swaps the module inside the model); the layers before it run on the image as usual.
* ``precision`` applies to the ablated forwards; in fp16/bf16 the ablation value is clipped to the
  dtype's finite range.
* A transformer layer (with ``reshape``) is ablated through the reshaped grid, which must be a view
  of the tokens (:func:`unioncam.ops.vit_reshape` and :func:`unioncam.ops.nhwc_to_nchw` are);
  pytorch-grad-cam needs its ``AblationLayerVit`` for this.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details
from unioncam.methods.forwards import LayerHook, batched_logits
from unioncam.methods.gradient import weighted_sum

ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE: below the minimum when activations can be negative


def ablation_values(acts: Tensor) -> Tensor:
    """Per image: 0 when its smallest activation is 0, else that minimum − 10⁷ (``B``)."""
    low = acts.flatten(1).amin(dim=1)
    return torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)


class AblationCAM(CAM):
    """Ablation-CAM: ``ReLU(Σ_k w_k A_k)``, ``w_k = (S_c − S_c^{(k)}) / S_c``; one forward per channel."""

    name = "ablationcam"
    family = "score"
    uses_gradients = False
    channel_forwards = True
    hooked_forwards = True

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        b, k = acts.shape[:2]
        values = ablation_values(acts)
        keep = ~(acts == values[:, None, None, None]).flatten(2).all(dim=2)  # B×K: ablating changes something
        pairs = keep.nonzero()
        img_idx, ch_idx = pairs[:, 0], pairs[:, 1]
        original = logits.gather(1, targets[:, None])[:, 0].to(acts.dtype)

        def hook(sl: slice) -> LayerHook:
            rows = torch.arange(sl.stop - sl.start, device=acts.device)

            def replace(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
                out = output.clone()
                grid = self._grid(out, out.shape[0])  # a transformer's tokens: the grid must be a view of them
                if grid.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
                    raise ValueError(f"{self.name}: the reshape of the target layer's output must return a view "
                                     "of it (as vit_reshape and nhwc_to_nchw do) to ablate its channels")
                value = values[img_idx[sl]].to(out.dtype).clamp_min(torch.finfo(out.dtype).min)
                grid[rows, ch_idx[sl]] = value[:, None, None]
                return out

            return replace

        scores = batched_logits(self.model, targets[img_idx], lambda sl: images[img_idx[sl]], img_idx.numel(),
                                self.batch_size, self.precision, self.layers[0], hook)
        weights = torch.zeros(b, k, dtype=acts.dtype, device=acts.device)
        weights[img_idx, ch_idx] = ((original[img_idx] - scores.to(acts.dtype)) / original[img_idx])
        return weighted_sum(weights, acts), {"forwards": keep.sum(dim=1)}
