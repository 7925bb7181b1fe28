"""KPCA-CAM (Karmani et al., 2024, arXiv:2410.00267), as pytorch-grad-cam 1.5.7's ``KPCA_CAM`` computes it:
Eigen-CAM with kernel PCA in place of PCA.

Per image, ``X`` is the ``hw×K`` matrix of activations (NaN read as 0), centered over the positions;
``Kₓ = κ(X, X)`` its ``hw×hw`` kernel matrix, double-centered (scikit-learn's ``KernelCenterer``); the
map is its first kernel principal component ``v₁ √λ₁`` (``λ₁`` the largest eigenvalue, clipped at 0,
``v₁`` its unit eigenvector), then ReLU. ``κ`` is scikit-learn's (``KernelPCA(n_components=1,
kernel=kernel, gamma=gamma)``, which pytorch-grad-cam calls): ``sigmoid`` (default)
``tanh(γ x·y + 1)``, ``rbf`` ``exp(−γ |x − y|²)``, ``poly`` ``(γ x·y + 1)³``, ``linear`` ``x·y``, ``cosine``;
``γ`` defaults to ``1/K``. Class-agnostic; one forward.

Decisions:

* Sign: as scikit-learn's ``svd_flip``, the eigenvector's entry of largest magnitude (the first of
  them) is made positive, so the map (whose ReLU keeps one side) does not depend on the eigensolver.
  scikit-learn picks LAPACK (``eigh``) below 200 positions and ARPACK above; we use
  ``torch.linalg.eigh`` on the device for all images at once, in float64 (scikit-learn works in the
  activations' float32), then cast back.
* No scikit-learn at run time: the kernels above are a few lines of torch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from unioncam.methods.base import CAM, Details

Kernel = Literal["sigmoid", "rbf", "poly", "linear", "cosine"]
KERNELS: tuple[str, ...] = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_matrix(x: Tensor, kernel: str, gamma: float | None) -> Tensor:
    """``B×N×N`` kernel of the rows of ``x`` (``B×N×K``), scikit-learn's ``pairwise_kernels`` with its
    defaults (``coef0 = 1``, ``degree = 3``, ``γ = 1/K`` when None)."""
    g = 1.0 / x.shape[-1] if gamma is None else float(gamma)
    if kernel == "rbf":
        sq = (x * x).sum(-1)
        dist = (sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)).clamp_min(0)
        return torch.exp(-g * dist)
    if kernel == "cosine":
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return unit @ unit.transpose(1, 2)
    dot = x @ x.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(g * dot + 1.0)
    if kernel == "poly":
        return (g * dot + 1.0) ** 3
    if kernel == "linear":
        return dot
    raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")


def first_kernel_component(acts: Tensor, kernel: str = "sigmoid", gamma: float | None = None) -> Tensor:
    """``B×K×h×w`` to ``B×h×w``: each image's first kernel principal component (see the module docstring)."""
    b, k, h, w = acts.shape
    x = torch.nan_to_num(acts.detach(), nan=0.0).to(torch.float64).reshape(b, k, h * w).transpose(1, 2)
    x = x - x.mean(dim=1, keepdim=True)
    gram = kernel_matrix(x, kernel, gamma)
    gram = gram - gram.mean(dim=1, keepdim=True) - gram.mean(dim=2, keepdim=True) + gram.mean(dim=(1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(gram)
    top, vec = values[:, -1].clamp_min(0), vectors[:, :, -1]
    pivot = vec.abs().argmax(dim=1, keepdim=True)  # svd_flip: the largest entry positive
    vec = vec * torch.sign(vec.gather(1, pivot))
    return (vec * top.sqrt()[:, None]).reshape(b, h, w).to(acts.dtype)


class KPCACAM(CAM):
    """KPCA-CAM: ``ReLU(first kernel principal component of A)``. Options ``kernel`` ("sigmoid") and
    ``gamma`` (None: ``1/K``)."""

    name = "kpcacam"
    family = "activation"
    uses_gradients = False
    class_targets = False

    def __init__(self, *args: object, kernel: Kernel = "sigmoid", gamma: float | None = None,
                 **kwargs: object) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kpcacam: unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.kernel: str = kernel
        self.gamma = gamma

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        return first_kernel_component(acts, self.kernel, self.gamma).clamp_min(0), {}
