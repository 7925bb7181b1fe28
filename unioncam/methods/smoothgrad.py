"""Smooth Grad-CAM++ (Omeiza et al., 2019), as TorchCAM 0.5.0's ``SmoothGradCAMpp`` computes it.

``N`` noisy copies ``x + δ_s`` of the image (``δ_s ~ N(0, std²)`` per pixel, TorchCAM's defaults
``N = 4``, ``std = 0.3``, added to the model's input: pixels here) each run a forward and a backward
with the target layer hooked, giving ``g_s = ∂S_c/∂A`` at the noisy input. With ``A⁰`` the clean
image's activations (the explaining forward) and ``D₂ = mean_s g_s²``, ``D₃ = mean_s g_s³``:

``α_kij = D₂,kij / (2 D₂,kij + Σ_ab D₃,kab A⁰_kab + 10⁻⁸)``, ``w_k = Σ_ij α_kij ReLU(g_N,kij)``,
map ``ReLU(Σ_k w_k A^N_k)``.

TorchCAM's quirks, kept so the maps equal its own:

* The map combines the **last noisy sample's** activations ``A^N`` (and ``α`` multiplies the last
  sample's gradient ``g_N``), not the clean image's: TorchCAM's activation hook stays on during the
  noisy forwards and overwrites the activations it saved, and ``_compute_smoothgrad_weights`` returns
  ``α ⊙ ReLU(hook_g)`` where ``hook_g`` holds the last sample's gradient. Only ``α``'s denominator uses
  the clean activations ``A⁰``.
* ``α``'s denominator sums ``D₃ ⊙ A⁰`` over the positions (a number per channel), where Grad-CAM++'s
  paper has ``D₃,kij · Σ_ab A_kab``; and ``α`` keeps TorchCAM's ``+10⁻⁸``.

Decisions of ours:

* Noise: each image draws its own from a CPU ``torch.Generator`` seeded with ``seed`` (default 0),
  sample after sample, each a ``3×H×W`` float32 tensor (the order and dtype TorchCAM draws a one-image
  batch in after ``torch.manual_seed(seed)``), moved to the device afterwards. So an image's map depends
  on the seed only, not on its batch, the batch size or the device, and a one-image call equals
  TorchCAM's given the same seed. (TorchCAM draws one tensor for the whole batch.)
* The noisy passes run all the batch's images at once, one pass per sample (the memory of the
  explaining pass), in IEEE fp32 whatever ``precision`` is (they need a backward). Each hooks the
  target layer alone (``hooked_forwards``) and differentiates with ``torch.autograd.grad``. They
  count in the engine's masked-input counter, ``N`` per image (:meth:`SmoothGradCAMpp.masked_forwards`;
  ``extra_forwards`` is TorchCAM's ``N = 4``); the explaining pass itself needs no backward.
* The noisy input is not clipped to ``[0, 1]`` (TorchCAM adds the noise as it is).
* A callable target must name its class (``category``): the noisy passes score that class's logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details
from unioncam.methods.forwards import count_masked_inputs
from unioncam.methods.gradient import weighted_sum

ALPHA_EPS = 1e-8  # TorchCAM's eps in α's denominator


class SmoothGradCAMpp(CAM):
    """Smooth Grad-CAM++ (TorchCAM's): Grad-CAM++ weights from ``num_samples`` (4) noisy copies of the
    image, noise std ``std`` (0.3), seeded by ``seed`` (0); see the module docstring."""

    name = "smoothgradcampp"
    uses_gradients = False  # the explaining pass only records A⁰: the gradients come from the noisy passes
    seeded = True
    hooked_forwards = True
    extra_forwards = 4  # TorchCAM's default num_samples (forward + backward each); see masked_forwards

    def __init__(self, *args: object, num_samples: int = 4, std: float = 0.3, seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.std = float(std)
        self.seed = int(seed)

    def masked_forwards(self, images: int, channels: int, active: int, live: int) -> int:
        """``num_samples`` noisy forwards (each with a backward) per image."""
        return images * self.num_samples

    def _noisy_pass(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, ∂S_c/∂A)`` at the target layer for the inputs ``x`` (through :attr:`reshape`)."""
        captured: list[Tensor] = []

        def capture(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            act = output if output.requires_grad else output.detach().requires_grad_(True)
            captured.append(act)
            return act.clone()  # an in-place op after the layer cannot modify A

        count_masked_inputs(x.shape[0])
        handle = self.layers[0].register_forward_hook(capture)
        try:
            with torch.enable_grad():
                logits = self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{self.name}: the target layer ran {len(captured)} times in one forward")
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured[0], allow_unused=True)
        act = captured[0].detach()
        grad = torch.zeros_like(act) if grad is None else grad
        return self._grid(act, x.shape[0]), self._grid(grad, x.shape[0])

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        b = images.shape[0]
        generators = [torch.Generator().manual_seed(self.seed) for _ in range(b)]
        grad_2 = torch.zeros_like(acts)
        grad_3 = torch.zeros_like(acts)
        last_acts = last_grads = acts
        for _ in range(self.num_samples):
            noise = torch.stack([torch.normal(0.0, self.std, tuple(images.shape[1:]), generator=g)
                                 for g in generators])
            last_acts, last_grads = self._noisy_pass(images + noise.to(device=images.device, dtype=images.dtype),
                                                     targets)
            grad_2 += last_grads.pow(2)
            grad_3 += last_grads.pow(3)
        grad_2 /= self.num_samples
        grad_3 /= self.num_samples
        alpha = grad_2 / (2 * grad_2 + (grad_3 * acts).sum(dim=(2, 3), keepdim=True) + ALPHA_EPS)
        weights = (alpha * last_grads.clamp_min(0)).sum(dim=(2, 3))
        details: Details = {"forwards": torch.full((b,), self.num_samples, device=acts.device),
                            "seed": [self.seed] * b}
        return weighted_sum(weights, last_acts), details
