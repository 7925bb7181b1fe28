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
* The layers before the target layer run on one copy of the image per batch (``share_prefix``, on by
  default): the hook widens the layer's output to the batch and ablates one channel per row, so a batch of
  32 ablations costs one image's forward up to the layer plus 32 of the rest (pytorch-grad-cam runs the
  whole network 32 times). Tensors from before the layer that reach later layers (skip connections)
  broadcast from the one copy. Each instance checks this once, on its first batch, against the plain
  path (32 copies of the image), to within 10⁻³ (fp32; 0.1 in reduced precisions) of the largest ablation
  effect ``|S_c − S_c^(k)|``; a model where it fails or differs (a skip concatenated along channels, a
  reshape by the input's batch, a compiled model) takes the plain path, whose batches pack ablations of
  several images together. The two agree to rounding (a conv at batch 1 against batch 32: 1e-6 in fp32).
* ``precision`` applies to the ablated forwards; in fp16/bf16 the ablation value is clipped to the
  dtype's finite range.
* A transformer layer (with ``reshape``) is ablated through the reshaped grid, which must be a view
  of the tokens (:func:`unioncam.ops.vit_reshape` and :func:`unioncam.ops.nhwc_to_nchw` are);
  pytorch-grad-cam needs its ``AblationLayerVit`` for this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.forwards import LayerHook, batched_logits
from unioncam.methods.gradient import weighted_sum

ONE_COPY_TOLERANCE = 1e-3  # the one-copy path's logits against the plain path's, of the largest effect (fp32)
REDUCED_TOLERANCE = 0.1  # the same in fp16/bf16/tf32, where batch 1 and batch 32 round differently
ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE: below the minimum when activations can be negative


def ablation_values(acts: Tensor) -> Tensor:
    """Per image: 0 when its smallest activation is 0, else that minimum − 10⁷ (``B``)."""
    low = acts.flatten(1).amin(dim=1)
    return torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)


class AblationCAM(CAM):
    """Ablation-CAM: ``ReLU(Σ_k w_k A_k)``, ``w_k = (S_c − S_c^{(k)}) / S_c``; one forward per channel.
    Option ``share_prefix`` (True): run the layers before the target layer once per batch (module docstring)."""

    name = "ablationcam"
    family = "score"
    uses_gradients = False
    channel_forwards = True
    hooked_forwards = True

    def __init__(self, *args: object, share_prefix: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        #: None until the first batch shows whether the one-copy path gives the plain path's logits here
        self._one_copy: bool | None = None if share_prefix and getattr(self.model, "_compiled", None) is None \
            else False

    def _ablate(self, output: Tensor, channels: Tensor, values: Tensor) -> Tensor:
        """``output`` (one row per ablation, or one row widened to ``len(channels)``) with channel
        ``channels[r]`` of row ``r`` set to ``values[r]``."""
        n = channels.numel()
        out = output.expand(n, *output.shape[1:]).clone() if output.shape[0] == 1 else output.clone()
        grid = self._grid(out, n)  # a transformer's tokens: the grid must be a view of them
        if grid.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            raise ValueError(f"{self.name}: the reshape of the target layer's output must return a view "
                             "of it (as vit_reshape and nhwc_to_nchw do) to ablate its channels")
        grid[torch.arange(n, device=out.device), channels] = values.to(out.dtype).clamp_min(
            torch.finfo(out.dtype).min)[:, None, None]
        return out

    def _plain(self, images: Tensor, targets: Tensor, img_idx: Tensor, ch_idx: Tensor, values: Tensor) -> Tensor:
        """The ablated logits, each ablation a row of its own (batches pack several images' ablations)."""
        def hook(sl: slice) -> LayerHook:
            return lambda _m, _i, output: self._ablate(output, ch_idx[sl], values[img_idx[sl]])

        return batched_logits(self.model, targets[img_idx], lambda sl: images[img_idx[sl]], img_idx.numel(),
                              self.batch_size, self.precision, self.layers[0], hook)

    def _one_image(self, image: Tensor, target: Tensor, channels: Tensor, value: Tensor, count: bool = True) -> Tensor:
        """One image's ablated logits, the layers before the target layer run on one copy per batch
        (counted as one masked input per ablation unless ``count`` is False: the check's, which the plain
        path counts). Raises ``RuntimeError`` when the model's output is not one row per ablation."""
        def hook(sl: slice) -> LayerHook:
            return lambda _m, _i, output: self._ablate(output, channels[sl], value.expand(sl.stop - sl.start))

        n = channels.numel()
        return batched_logits(self.model, target.expand(n), lambda _sl: image[None], n, self.batch_size,
                              self.precision, self.layers[0], hook, count)

    def _shared(self, images: Tensor, targets: Tensor, img_idx: Tensor, ch_idx: Tensor, values: Tensor,
                original: Tensor) -> Tensor:
        """The ablated logits through :meth:`_one_image`, image by image. The first call of an instance
        checks its first batch against :meth:`_plain`: the two must agree to within ``tol`` of the largest
        ablation effect ``|S_c − S_c^(k)|`` (a path whose ablations did nothing differs by all of it);
        otherwise it falls back to :meth:`_plain` for good (the checked batch is not forwarded again)."""
        scores = torch.empty(img_idx.numel(), dtype=torch.promote_types(images.dtype, torch.float32),
                             device=images.device)
        for i in img_idx.unique().tolist():
            rows = (img_idx == i).nonzero()[:, 0]
            if self._one_copy is None:
                first = rows[: self.batch_size]
                try:
                    got: Tensor | None = self._one_image(images[i], targets[i], ch_idx[first], values[i], count=False)
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError):  # the model cannot take one copy (a skip concatenated, ...)
                    got = None
                want = self._plain(images, targets, img_idx[first], ch_idx[first], values)
                scores[first] = want
                tol = ONE_COPY_TOLERANCE if self.precision == "fp32" else REDUCED_TOLERANCE
                effect = float((original[i].to(want.dtype) - want).abs().amax())
                self._one_copy = got is not None and float((got - want).abs().amax()) <= tol * effect
                if not self._one_copy:
                    rest = torch.ones(img_idx.numel(), dtype=torch.bool, device=img_idx.device)
                    rest[first] = False
                    if bool(rest.any()):  # (none left: the checked batch was all)
                        scores[rest] = self._plain(images, targets, img_idx[rest], ch_idx[rest], values)
                    return scores
                rows = rows[first.numel():]
            if rows.numel():
                scores[rows] = self._one_image(images[i], targets[i], ch_idx[rows], values[i])
        return scores

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        b, k = acts.shape[:2]
        values = ablation_values(acts)
        keep = ~(acts == values[:, None, None, None]).flatten(2).all(dim=2)  # B×K: ablating changes something
        pairs = keep.nonzero()
        img_idx, ch_idx = pairs[:, 0], pairs[:, 1]
        original = logits.gather(1, targets[:, None])[:, 0].to(acts.dtype)
        if self._one_copy is False or not img_idx.numel():
            scores = self._plain(images, targets, img_idx, ch_idx, values)
        else:
            scores = self._shared(images, targets, img_idx, ch_idx, values, original)
        weights = torch.zeros(b, k, dtype=acts.dtype, device=acts.device)
        weights[img_idx, ch_idx] = ((original[img_idx] - scores.to(acts.dtype)) / original[img_idx])
        return weighted_sum(weights, acts), {"forwards": keep.sum(dim=1)}
