"""SS-CAM (Wang et al., 2020, "Smoothed Score-CAM") and IS-CAM (Naidu et al., 2020, "Integrated
Score-CAM"), as TorchCAM 0.5.0's ``SSCAM`` and ``ISCAM`` compute them.

Both weight the channels with a softmax over channels of a mean of masked-input *logits*:
``w = softmax_k( mean_s S_c(M_ks ⊙ x) )``, map ``ReLU(Σ_k w_k A_k)``, where ``H_k = up(ψ(A_k))`` with
``ψ(a) = (a − min) / (max − min + 10⁻⁸)`` per channel at the layer's resolution (TorchCAM's
``_normalize``), upsampled bilinearly to the input:

* SS-CAM: ``M_ks = H_k + δ_ks``, ``δ ~ N(0, std²)`` drawn at input resolution, ``s = 1..N``
  (TorchCAM's defaults ``N = 35``, ``std = 2``);
* IS-CAM: ``M_ks = γ_s H_k`` with ``γ_s = Σ_{j=1..s} j / N`` (TorchCAM's running coefficient, so
  ``γ_N = (N + 1) / 2``; default ``N = 10``). IS-CAM draws no random numbers.

Decisions:

* TorchCAM subtracts the logit of the unmasked image from every score before the softmax; a constant
  per image does not change a softmax over channels, so we do not run that forward.
* SS-CAM's noise: each image draws its own from a CPU ``torch.Generator`` seeded with ``seed``
  (default 0), sample after sample, each a ``K×H×W`` tensor in float32 (the order and dtype TorchCAM
  draws a one-image batch in, after ``torch.manual_seed(seed)``); it is moved to the device
  afterwards. So an image's map depends on the seed only, not on its batch, the batch size or the
  device, and a one-image call equals TorchCAM's given the same seed. (TorchCAM draws one tensor for
  the whole batch, so its maps change with the batch.)
* SS-CAM: every (channel, sample) pair costs one masked forward, constant channels included (their
  mask is noise alone, but the softmax still weighs them): ``N·K`` per image.
* IS-CAM: channels whose ``ψ(A_k)`` are equal (every constant channel's is all zero; ReLU6 layers have
  many equal ones) have equal masks for every sample, hence equal inputs and scores: each distinct
  ``ψ(A_k)`` is forwarded once per sample and its logit given to all its channels, ``N·U`` forwards per
  image for ``U`` distinct maps (EfficientNet-Lite0's ``head_act``: ``U`` = 445 of ``K`` = 1280 on the
  chelsea photo at 112 px, 505 at 224 px). The weights are the same as forwarding every channel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.forwards import batched_logits
from unioncam.methods.gradient import weighted_sum
from unioncam.ops import min_max_eps, upsample

NORM_EPS = 1e-8  # TorchCAM's _normalize


class _SmoothedScoreCAM(CAM):
    family = "score"
    uses_gradients = False
    channel_forwards = True  # its forwards follow the channels: every channel, num_samples times

    def masked_forwards(self, images: int, channels: int, active: int) -> int:
        return channels * self.num_samples

    def __init__(self, *args: object, num_samples: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def masks(self, i: int, sample: int, up: Tensor) -> Tensor:
        """The ``K×H×W`` masks of image ``i`` for ``sample`` (0-based), from its upsampled maps ``up``."""
        raise NotImplementedError

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        b, k = acts.shape[:2]
        size = (images.shape[-2], images.shape[-1])
        totals = torch.zeros(b, k, dtype=torch.promote_types(acts.dtype, torch.float32), device=acts.device)
        forwards = torch.zeros(b, dtype=torch.long, device=acts.device)
        self._begin(b)
        for i in range(b):
            forwards[i] = self._image_totals(i, images[i], targets[i], acts[i], size, totals[i])
        weights = (totals / self.num_samples).softmax(dim=1).to(acts.dtype)
        return weighted_sum(weights, acts), self._details({"forwards": forwards}, b)

    def _image_totals(self, i: int, image: Tensor, target: Tensor, acts: Tensor, size: tuple[int, int],
                      totals: Tensor) -> int:
        """Add image ``i``'s masked logits, summed over the samples, to its ``K`` ``totals`` (in place);
        returns the masked forwards run: every channel once per sample."""
        k = acts.shape[0]
        up = upsample(min_max_eps(acts[None], NORM_EPS), size)[0]
        for s in range(self.num_samples):
            masks = self.masks(i, s, up)

            def inputs(sl: slice, masks: Tensor = masks) -> Tensor:
                return masks[sl, None] * image

            totals += batched_logits(self.model, target.expand(k), inputs, k, self.batch_size, self.precision)
        return k * self.num_samples

    def _begin(self, batch: int) -> None:
        """Before the first image (SS-CAM seeds its generators here)."""

    def _details(self, details: Details, batch: int) -> Details:
        return details


class SSCAM(_SmoothedScoreCAM):
    """SS-CAM: Score-CAM weights averaged over ``num_samples`` (35) noisy masks, noise std ``std`` (2),
    seeded by ``seed`` (0); see the module docstring."""

    name = "sscam"
    seeded = True

    def __init__(self, *args: object, num_samples: int = 35, std: float = 2.0, seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(*args, num_samples=num_samples, **kwargs)
        self.std = float(std)
        self.seed = int(seed)
        self._generators: list[torch.Generator] = []

    def _begin(self, batch: int) -> None:
        self._generators = [torch.Generator().manual_seed(self.seed) for _ in range(batch)]

    def masks(self, i: int, sample: int, up: Tensor) -> Tensor:
        noise = torch.normal(0.0, self.std, tuple(up.shape), generator=self._generators[i])
        return up + noise.to(device=up.device, dtype=up.dtype)

    def _details(self, details: Details, batch: int) -> Details:
        return {**details, "seed": [self.seed] * batch}


class ISCAM(_SmoothedScoreCAM):
    """IS-CAM: Score-CAM weights averaged over ``num_samples`` (10) masks scaled by TorchCAM's running
    coefficient; deterministic."""

    name = "iscam"

    def __init__(self, *args: object, num_samples: int = 10, **kwargs: object) -> None:
        super().__init__(*args, num_samples=num_samples, **kwargs)

    def masks(self, i: int, sample: int, up: Tensor) -> Tensor:
        return self.coefficient(sample) * up

    def coefficient(self, sample: int) -> float:
        """``γ_s`` of ``sample`` (0-based): TorchCAM's running float sum."""
        return sum((j + 1) / self.num_samples for j in range(sample + 1))

    def masked_forwards(self, images: int, channels: int, active: int) -> int:
        """An estimate for progress: the non-constant channels plus the shared all-zero map, once per
        sample (equal non-constant maps, forwarded once, make the true count lower)."""
        return (active + images) * self.num_samples

    def _image_totals(self, i: int, image: Tensor, target: Tensor, acts: Tensor, size: tuple[int, int],
                      totals: Tensor) -> int:
        """As SS-CAM's, but each distinct ``ψ(A_k)`` is forwarded once per sample (``N·U`` forwards),
        its masked inputs of all samples sharing forward batches; each sample's logits are added to
        ``totals`` in turn, as if every channel had been forwarded."""
        low = min_max_eps(acts[None], NORM_EPS)[0]
        distinct, inverse = torch.unique(low.flatten(1), dim=0, return_inverse=True)
        u = distinct.shape[0]
        up = upsample(distinct.view(u, *low.shape[1:])[None], size)[0]  # U×H×W, as the K maps would be
        coeffs = [self.coefficient(s) for s in range(self.num_samples)]

        def inputs(sl: slice) -> Tensor:  # row r: sample r // U, distinct map r % U
            rows = []
            for s in range(sl.start // u, (sl.stop - 1) // u + 1):
                lo, hi = max(sl.start, s * u) - s * u, min(sl.stop, (s + 1) * u) - s * u
                rows.append(coeffs[s] * up[lo:hi])
            return torch.cat(rows)[:, None] * image

        logits = batched_logits(self.model, target.expand(u * self.num_samples), inputs, u * self.num_samples,
                                self.batch_size, self.precision)
        for s in range(self.num_samples):
            totals += logits[s * u : (s + 1) * u][inverse]
        return u * self.num_samples
