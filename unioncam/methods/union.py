"""UnionCAM: denoising (AMD), union (AMU) and selection (AMS), equations 1 to 8 of the paper.

Each module is a function so the paper's ablations can be run: :class:`UnionCAM` with
``stage="amd"`` returns ``L_Den`` (AMD alone), ``stage="amu"`` returns ``L_DeReg`` (AMD+AMU), and
``stage="ams"`` (default) the full method. All maps here are at input size, in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from unioncam.engine import masked_scores
from unioncam.methods.base import CAM, Details
from unioncam.methods.score import region_map
from unioncam.ops import black_image_probs, normalize, safe_divide, upsample

Stage = Literal["amd", "amu", "ams"]
STAGES: tuple[str, ...] = ("amd", "amu", "ams")


def denoise_gradients(grads: Tensor, theta: float = 10.0) -> Tensor:
    """AMD, eq. 1: ``W_k = g_k`` where ``g_k ≥ t_k``, else 0, with ``t_k`` the θ-th percentile of
    ``g_k`` over its spatial positions (linear interpolation, as ``torch.quantile``)."""
    if not 0.0 <= theta <= 100.0:
        raise ValueError(f"theta is a percentile in [0, 100], got {theta}")
    flat = grads.flatten(2)
    t = torch.quantile(flat, theta / 100.0, dim=-1, keepdim=True)
    return torch.where(flat >= t, flat, torch.zeros_like(flat)).view_as(grads)


def pixel_average_alpha(denoised: Tensor) -> Tensor:
    """Eq. 3: ``α_kij = 1 / Σ_mn W_kmn·1[W_kmn > 0]`` where ``W_kij > 0``, else 0."""
    positive = denoised > 0
    total = (denoised * positive).sum(dim=(2, 3), keepdim=True)
    return safe_divide(1.0, total, positive)  # total > 0 wherever W_kij > 0


def amd(acts: Tensor, grads: Tensor, size: tuple[int, int], theta: float = 10.0) -> Tensor:
    """AMD: ``L_Den = norm(up(Σ_k α_k ⊙ ReLU(W_k) ⊙ A_k))`` (eqs. 1 to 3), ``B×H×W``."""
    denoised = denoise_gradients(grads, theta)
    cam = (pixel_average_alpha(denoised) * denoised.clamp_min(0) * acts).sum(dim=1)
    return normalize(upsample(cam, size))


def amu(model: nn.Module, images: Tensor, targets: Tensor, l_den: Tensor, l_reg: Tensor,
        batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """AMU: ``β_Den``, ``β_Reg`` (eqs. 4, 5) and ``L_DeReg = norm(β_Den·L_Den + β_Reg·L_Reg)`` (eq. 6).

    ``β_X = f_c(L_X ⊙ I0) − f_c(Ib)``; the ``2B`` masked inputs share forward batches, in fp32.

    Returns:
        ``(l_dereg, beta_den, beta_reg)``.
    """
    b = images.shape[0]
    index = torch.arange(b, device=images.device).repeat(2)
    probs = masked_scores(model, images, targets, index, torch.cat([l_den, l_reg]), batch_size)
    betas = probs - black_image_probs(model, images)[targets].repeat(2)
    beta_den, beta_reg = betas[:b].to(l_den.dtype), betas[b:].to(l_den.dtype)
    l_dereg = normalize(beta_den[:, None, None] * l_den + beta_reg[:, None, None] * l_reg)
    return l_dereg, beta_den, beta_reg


def ams(model: nn.Module, images: Tensor, targets: Tensor, l_dereg: Tensor, l_reg: Tensor,
        beta_reg: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """AMS: ``β_DeReg = f_c(L_DeReg ⊙ I0) − f_c(Ib)`` (eq. 7, in fp32); ``L_DeReg`` if ``β_DeReg > β_Reg``
    else ``L_Reg`` (eq. 8).

    Returns:
        ``(l_union, beta_dereg, chose_dereg)`` with ``chose_dereg`` a boolean tensor.
    """
    index = torch.arange(images.shape[0], device=images.device)
    probs = masked_scores(model, images, targets, index, l_dereg, batch_size)
    beta_dereg = (probs - black_image_probs(model, images)[targets]).to(l_dereg.dtype)
    chose = beta_dereg > beta_reg
    return torch.where(chose[:, None, None], l_dereg, l_reg), beta_dereg, chose


class UnionCAM(CAM):
    """UnionCAM: AMD → (Score-CAM region map) → AMU → AMS.

    Options: ``theta`` (AMD percentile, default 10), ``stage`` ("amd", "amu" or "ams": where to
    stop, for ablations), ``skip_constant`` (Score-CAM channel skipping, exact). ``precision``
    applies to the channel forwards of ``L_Region``; the three β forwards always run in fp32.

    Details: ``beta_den``, ``beta_reg``, ``beta_dereg`` (NaN for stages not run), ``selected``
    ("dereg" or "region"; "" before AMS), ``forwards`` (masked forwards per image), and
    ``region_map`` (``L_Region``, ``B×H×W``, absent for ``stage="amd"``): Score-CAM's map, already
    upsampled to the input size and normalized (:func:`unioncam.methods.score.region_map`). It *is*
    Score-CAM's output (normalizing it again, as the pipeline does, changes nothing), so a caller
    wanting both methods need not run the channel forwards twice.
    """

    name = "unioncam"
    family = "score"
    row_details: ClassVar[Mapping[str, str]] = {"beta_den": "float64", "beta_reg": "float64", "beta_dereg": "float64",
                                                "selected": "string"}
    provides: ClassVar[dict[str, str]] = {"scorecam": "region_map"}  # L_Region is Score-CAM's map (REFERENCE.md)
    channel_forwards = True
    extra_forwards = 2  # L_Den and L_Reg's β forwards (L_Dereg's third only when AMS needs it)
    report_sections = ("ams",)

    def __init__(self, *args: object, theta: float = 10.0, stage: Stage = "ams",
                 skip_constant: bool = True, **kwargs: object) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        if not 0.0 <= theta <= 100.0:
            raise ValueError(f"theta is a percentile in [0, 100], got {theta}")
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.theta = theta
        self.stage = stage
        self.skip_constant = skip_constant

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        b = images.shape[0]
        size = (images.shape[-2], images.shape[-1])
        nan = torch.full((b,), float("nan"), dtype=acts.dtype, device=acts.device)
        l_den = amd(acts, grads, size, self.theta)
        if self.stage == "amd":
            return l_den, {"beta_den": nan, "beta_reg": nan, "beta_dereg": nan, "selected": [""] * b,
                           "forwards": torch.zeros(b, dtype=torch.long, device=acts.device)}
        l_reg, forwards = region_map(self.model, images, targets, acts, self.batch_size, self.precision,
                                     self.skip_constant)
        # The 3 β forwards per image decide the AMS branch: they run in fp32 whatever the precision
        # of the channel forwards (the bulk of the work), so a near tie is not decided by rounding.
        l_dereg, beta_den, beta_reg = amu(self.model, images, targets, l_den, l_reg, self.batch_size)
        details: Details = {"beta_den": beta_den, "beta_reg": beta_reg, "beta_dereg": nan,
                            "selected": [""] * b, "forwards": forwards + 2, "region_map": l_reg}
        if self.stage == "amu":
            return l_dereg, details
        l_union, beta_dereg, chose = ams(self.model, images, targets, l_dereg, l_reg, beta_reg, self.batch_size)
        details.update(beta_dereg=beta_dereg, forwards=forwards + 3,
                       selected=["dereg" if c else "region" for c in chose.tolist()])
        return l_union, details
