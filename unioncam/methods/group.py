"""Group-CAM (Zhang, Rao & Yang, 2021, "Group-CAM: Group Score-Weighted Visual Explanations for Deep
Convolutional Networks"), as the authors' code (``cam/groupcam.py`` of github.com/wofmanaf/Group-CAM)
computes it, batched across groups and images. No library ships it.

1. Grad-CAM's weighting of the channels: ``Ã_k = mean_ij(g_k) · A_k`` (``g = ∂S_c/∂A``, the logit).
2. The channels split into groups (``groups``, ``G = 32``) and each group's maps are summed:
   ``M_l = ReLU(Σ_{k ∈ group l} Ã_k)``.
3. Denoising: values of ``M_l`` at or below its ``percentile``-th percentile (70, linear
   interpolation over its ``h·w`` positions, as ``np.percentile``) are set to 0.
4. ``M_l`` is upsampled (bilinear) to the input and min-max normalized to ``[0, 1]``; a group whose map
   is constant is skipped (no forward, no weight).
5. Each mask keeps its region of the image over a blurred copy:
   ``I_l = I ⊙ M_l + Ĩ ⊙ (1 − M_l)``, ``Ĩ`` a Gaussian blur of ``I`` (``blur_kernel = 51`` taps,
   ``σ = blur_sigma = 50``, reflect padding: kornia's ``gaussian_blur2d`` as the authors call it).
6. Weights: the score gain over the blurred image, ``α_l = f_c(I_l) − f_c(Ĩ)`` (``f_c``: the softmax
   probability of the class); map ``ReLU(Σ_l α_l M_l)``, normalized.

Decisions, each the authors' code's unless said:

* Groups are ``torch.chunk(Ã, G, dim=1)``: ``⌈K/G⌉`` consecutive channels each, so there are fewer
  than ``G`` groups when ``G`` does not divide ``K`` evenly (``K = 16``, ``G = 32``: 16 groups of one
  channel; ``K = 1280``, ``G = 32``: 32 groups of 40).
* The threshold is strict (``M > t`` is kept) and taken at the layer's resolution, before the
  upsampling; normalization after it, at input size.
* The blur is taken in pixel space (the authors blur the normalized tensor; with a kernel summing to 1
  and reflect padding, blurring commutes with the per-channel mean/std normalization, and so does the
  convex mix of step 5: the inputs are the same). Ours: when the image is smaller than the kernel
  allows (reflect padding needs ``kernel // 2 < H, W``; kornia would fail), the kernel is cut to the
  largest odd size that fits, ``2·min(H, W) − 1``, with the same σ.
* Ours: the masked inputs of all images and groups share forward batches (``batch_size``, ``precision``
  as Score-CAM's); the authors run one per forward, one image per call. The weighted sum is taken at
  the layer's resolution on the normalized maps and upsampled once (upsampling is linear; the
  normalization's min and max are the upsampled map's), then the ReLU, at input size as theirs.
* Forwards per image: one explaining forward and backward, one for the blurred image, and one per
  non-constant group (at most ``G``; :meth:`GroupCAM.masked_forwards` counts every group, for progress).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unioncam.engine import batched_probs
from unioncam.methods.base import CAM, Details
from unioncam.methods.gradient import gradcam_weights
from unioncam.ops import is_constant, upsample


def gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """kornia's sampled Gaussian: ``exp(−x²/(2σ²))`` at ``x = −size//2 … `` (half-integers for an even
    ``size``), normalized to sum 1."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    kernel = torch.exp(-x.pow(2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(images: Tensor, kernel: int = 51, sigma: float = 50.0) -> Tensor:
    """``B×C×H×W`` images blurred by the separable ``kernel``-tap Gaussian of ``sigma`` with reflect
    padding (kornia's ``gaussian_blur2d``), the kernel cut to ``2·min(H, W) − 1`` taps for small images."""
    h, w = images.shape[-2:]
    size = min(kernel, 2 * min(h, w) - 1)
    taps = gaussian_kernel1d(size, sigma, images.dtype, images.device)
    c = images.shape[1]
    top, left = (size - 1) // 2, (size - 1) // 2
    bottom, right = size - 1 - top, size - 1 - left
    out = F.pad(images, (left, right, top, bottom), mode="reflect")
    out = F.conv2d(out, taps.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(out, taps.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def group_count(channels: int, groups: int) -> int:
    """How many groups ``torch.chunk`` makes of ``channels`` for ``groups``: ``⌈K/⌈K/G⌉⌉``."""
    if channels <= 0:
        return 0
    size = -(-channels // groups)
    return -(-channels // size)


def group_maps(acts: Tensor, grads: Tensor, groups: int, percentile: float) -> Tensor:
    """Steps 1 to 3: ``B×G'×h×w`` thresholded group maps at the layer's resolution."""
    weighted = gradcam_weights(acts, grads)[:, :, None, None] * acts
    maps = torch.stack([chunk.sum(dim=1) for chunk in weighted.chunk(groups, dim=1)], dim=1).clamp_min(0)
    threshold = torch.quantile(maps.flatten(2), percentile / 100.0, dim=-1)
    return torch.where(maps > threshold[..., None, None], maps, torch.zeros_like(maps))


class GroupCAM(CAM):
    """Group-CAM: ``ReLU(Σ_l α_l M_l)`` over ``groups`` (32) gradient-weighted channel groups, ``α_l`` the
    softmax gain of keeping ``M_l``'s region over a blurred image. Options ``groups``, ``percentile``
    (70), ``blur_kernel`` (51), ``blur_sigma`` (50); see the module docstring."""

    name = "groupcam"
    family = "score"
    extra_forwards = 33  # the blurred image and at most G = 32 groups (the default); see masked_forwards
    channel_forwards = True  # the group count follows the channel count (masked_forwards)

    def __init__(self, *args: object, groups: int = 32, percentile: float = 70.0, blur_kernel: int = 51,
                 blur_sigma: float = 50.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if groups < 1:
            raise ValueError(f"groupcam: groups must be >= 1, got {groups}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"groupcam: percentile must lie in [0, 100], got {percentile}")
        if blur_kernel < 1 or blur_sigma <= 0:
            raise ValueError(f"groupcam: blur_kernel must be >= 1 and blur_sigma > 0, got {blur_kernel}, {blur_sigma}")
        self.groups, self.percentile = int(groups), float(percentile)
        self.blur_kernel, self.blur_sigma = int(blur_kernel), float(blur_sigma)

    def masked_forwards(self, images: int, channels: int, active: int, live: int) -> int:
        """Per image: the blurred image and one per group, ``⌈K/⌈K/G⌉⌉`` (constant groups, which are
        skipped, counted too: an upper bound)."""
        k = channels // images if images else 0
        return images * (1 + group_count(k, self.groups))

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        b = images.shape[0]
        size = (images.shape[-2], images.shape[-1])
        maps = group_maps(acts, grads, self.groups, self.percentile)  # B×G×h×w
        keep = ~is_constant(maps)  # bilinear upsampling keeps a map constant or not
        low = torch.empty(maps.shape[:2], dtype=maps.dtype, device=maps.device)
        span = torch.ones_like(low)
        for i in range(b):  # the min and max of the upsampled maps, one image at a time
            up = upsample(maps[i], size)
            low[i] = up.amin(dim=(-2, -1))
            span[i] = torch.where(keep[i], up.amax(dim=(-2, -1)) - low[i], torch.ones_like(low[i]))
        blurred = gaussian_blur(images, self.blur_kernel, self.blur_sigma)
        base = batched_probs(self.model, targets, lambda sl: blurred[sl], b, self.batch_size, self.precision)
        pairs = keep.nonzero()
        img_idx, grp_idx = pairs[:, 0], pairs[:, 1]

        def inputs(sl: slice) -> Tensor:
            i, g = img_idx[sl], grp_idx[sl]
            mask = ((upsample(maps[i, g], size) - low[i, g, None, None]) / span[i, g, None, None])[:, None]
            return images[i] * mask + blurred[i] * (1 - mask)

        probs = batched_probs(self.model, targets[img_idx], inputs, img_idx.numel(), self.batch_size, self.precision)
        weights = torch.zeros_like(low)
        weights[img_idx, grp_idx] = (probs - base[img_idx]).to(weights.dtype)
        normalized = torch.where(keep[..., None, None], (maps - low[..., None, None]) / span[..., None, None],
                                 torch.zeros_like(maps))
        cam = torch.einsum("bg,bghw->bhw", weights, normalized)
        return upsample(cam, size).clamp_min(0), {"forwards": keep.sum(dim=1) + 1}
