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
* Dead channels (``A_k = 0`` at every position; after a ReLU or ReLU6 they are common:
  EfficientNet-Lite0's ``head_act`` has 751 of 1280 on the chelsea photo at 224 px, 484 to 751 on
  the four benchmark photos) are not forwarded. Their term ``w_k A_k`` is 0 whatever ``w_k``; their
  only effect is on the softmax's denominator ``Z = Σ_j exp(m_j)``, a positive factor of the whole map,
  which the base's min-max normalization removes: the map is ``ReLU(Σ_live e^{m_k} A_k) / Z``, and
  ``norm(up(M / Z)) = norm(up(M))``. So the live channels' softmax is taken alone (dead channels get
  weight 0) and the maps are the references' up to rounding. (Only where the reference's fp32 softmax
  underflows every live weight to 0 against a dead channel's mean logit, a gap beyond about 100, is its
  map all zero where ours is not.) A constant non-zero channel adds ``w_k c`` everywhere, which changes
  the map wherever the ReLU clips (a layer with negative values): it is forwarded.
* SS-CAM: every live (channel, sample) pair costs one masked forward: ``N·L`` per image for ``L`` live
  channels. The noise is still drawn for all ``K`` channels, so each channel's noise is the one TorchCAM
  gives it.
* IS-CAM: live channels whose ``ψ(A_k)`` are equal (every constant channel's is all zero; ReLU6 layers
  have many equal ones) have equal masks for every sample, hence equal inputs and scores: each distinct
  ``ψ(A_k)`` is forwarded once per sample and its logit given to all its channels, ``N·U`` forwards per
  image for ``U`` distinct maps (EfficientNet-Lite0's ``head_act``: ``U`` = 445 of ``K`` = 1280 on the
  chelsea photo at 112 px, 504 at 224 px: the zero map is forwarded only when a constant non-zero channel
  needs it). The live channels' weights are the same as forwarding every live channel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details
from unioncam.methods.forwards import batched_logits
from unioncam.methods.gradient import weighted_sum
from unioncam.ops import is_zero, min_max_eps, upsample

NORM_EPS = 1e-8  # TorchCAM's _normalize


class _SmoothedScoreCAM(CAM):
    family = "score"
    uses_gradients = False
    channel_forwards = True  # its forwards follow the channels: the live ones, num_samples times

    def masked_forwards(self, images: int, channels: int, active: int, live: int) -> int:
        """The live channels (not 0 everywhere), once per sample: exact for SS-CAM."""
        return live * self.num_samples

    def __init__(self, *args: object, num_samples: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        b, k = acts.shape[:2]
        size = (images.shape[-2], images.shape[-1])
        live = ~is_zero(acts)  # B×K: not 0 everywhere (dead channels are not forwarded)
        totals = torch.zeros(b, k, dtype=torch.promote_types(acts.dtype, torch.float32), device=acts.device)
        forwards = torch.zeros(b, dtype=torch.long, device=acts.device)
        self._begin(b)
        for i in range(b):
            channels = live[i].nonzero()[:, 0]
            if channels.numel():
                forwards[i] = self._image_totals(i, images[i], targets[i], acts[i, channels], size,
                                                 totals[i], channels)
        # the live channels' softmax (see the module docstring); an image without one has all weights 0
        means = (totals / self.num_samples).masked_fill(~live, float("-inf"))
        weights = means.softmax(dim=1).masked_fill(~live, 0.0).to(acts.dtype)
        return weighted_sum(weights, acts), self._details({"forwards": forwards}, b)

    def _image_totals(self, i: int, image: Tensor, target: Tensor, acts: Tensor, size: tuple[int, int],
                      totals: Tensor, channels: Tensor) -> int:
        """Add image ``i``'s masked logits, summed over the samples, to ``totals[channels]`` (``totals``:
        its ``K`` totals, in place) for its live ``channels`` (indices; ``acts``: their ``L×h×w``
        activations); returns the masked forwards run."""
        raise NotImplementedError

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

    def _image_totals(self, i: int, image: Tensor, target: Tensor, acts: Tensor, size: tuple[int, int],
                      totals: Tensor, channels: Tensor) -> int:
        """Each live channel once per sample (``N·L`` forwards); each sample's noise is drawn for all
        ``K`` channels, in TorchCAM's order, and the live channels' rows are used."""
        n = channels.numel()
        up = upsample(min_max_eps(acts[None], NORM_EPS), size)[0]  # ψ is per channel: the live ones alone
        shape = (totals.shape[0], *up.shape[1:])
        for _ in range(self.num_samples):
            noise = torch.normal(0.0, self.std, shape, generator=self._generators[i])
            masks = up + noise[channels.cpu()].to(device=up.device, dtype=up.dtype)

            def inputs(sl: slice, masks: Tensor = masks) -> Tensor:
                return masks[sl, None] * image

            totals[channels] += batched_logits(self.model, target.expand(n), inputs, n, self.batch_size,
                                               self.precision)
        return n * self.num_samples

    def _details(self, details: Details, batch: int) -> Details:
        return {**details, "seed": [self.seed] * batch}


class ISCAM(_SmoothedScoreCAM):
    """IS-CAM: Score-CAM weights averaged over ``num_samples`` (10) masks scaled by TorchCAM's running
    coefficient; deterministic."""

    name = "iscam"

    def __init__(self, *args: object, num_samples: int = 10, **kwargs: object) -> None:
        super().__init__(*args, num_samples=num_samples, **kwargs)

    def coefficient(self, sample: int) -> float:
        """``γ_s`` of ``sample`` (0-based): TorchCAM's running float sum."""
        return sum((j + 1) / self.num_samples for j in range(sample + 1))

    def masked_forwards(self, images: int, channels: int, active: int, live: int) -> int:
        """An estimate for progress: the non-constant channels plus a shared all-zero map, once per
        sample (equal non-constant maps, forwarded once, make the true count lower)."""
        return (active + images) * self.num_samples

    def _image_totals(self, i: int, image: Tensor, target: Tensor, acts: Tensor, size: tuple[int, int],
                      totals: Tensor, channels: Tensor) -> int:
        """Each distinct ``ψ(A_k)`` of the live channels is forwarded once per sample (``N·U`` forwards),
        its masked inputs of all samples sharing forward batches; each sample's logits are added to
        ``totals`` in turn, as if every live channel had been forwarded."""
        low = min_max_eps(acts[None], NORM_EPS)[0]
        distinct, inverse = torch.unique(low.flatten(1), dim=0, return_inverse=True)
        u = distinct.shape[0]
        up = upsample(distinct.view(u, *low.shape[1:])[None], size)[0]  # U×H×W, as the L maps would be
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
            totals[channels] += logits[s * u : (s + 1) * u][inverse]
        return u * self.num_samples
