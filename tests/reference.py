"""Independent float64 NumPy references for the tests, written from REFERENCE.md's formulas.

The test network makes every quantity derivable by hand:
``x → conv3×3 (pad 1) → ReLU =: A (K×8×8) → flatten → linear (V, b) → S``.
So ``g = ∂S_c/∂A = V[c].reshape(K, 8, 8)`` exactly, and the activation resolution equals the
input's, so no upsampling is involved. Nothing here calls unioncam.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from unioncam.models import PixelModel

K, H, W, C = 5, 8, 8, 6


class HandNet(nn.Module):
    """The test network; channels 3 and 4 have zero filters, so their maps are constant
    (bias −1 → all 0; bias 0.7 → all 0.7)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(K * H * W, C)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(K, 3, 3, 3, generator=gen) * 0.8)
            self.conv.bias.copy_(torch.tensor([1.0, -0.2, 0.3, -1.0, 0.7]))
            self.conv.weight[3:] = 0
            self.fc.weight.copy_(torch.randn(C, K * H * W, generator=gen) * 0.3)
            self.fc.bias.copy_(torch.randn(C, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


def hand_model() -> PixelModel:
    """HandNet in float64, identity normalization, target layer "act"."""
    return PixelModel(HandNet(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "act").double().eval()


def hand_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Reference:
    """Activations, gradients and class probabilities of :class:`HandNet` in NumPy."""

    def __init__(self, model: PixelModel) -> None:
        net = model.net
        self._model = model
        self.V = net.fc.weight.detach().numpy().reshape(C, K, H, W)

    def acts(self, x: torch.Tensor) -> np.ndarray:
        net = self._model.net
        with torch.no_grad():
            return torch.relu(net.conv(x)).numpy()

    def grads(self, c: int) -> np.ndarray:
        return self.V[c]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for a batch of NumPy images."""
        with torch.no_grad():
            logits = self._model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def norm(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return np.zeros_like(m) if hi <= lo else (m - lo) / (hi - lo)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    w = g.mean(axis=(1, 2))
    return norm(relu(np.tensordot(w, a, axes=1)))


def gradcampp(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    w = np.zeros(K)
    for k in range(K):
        s = a[k].sum()
        for i in range(H):
            for j in range(W):
                den = 2 * g[k, i, j] ** 2 + s * g[k, i, j] ** 3
                alpha = g[k, i, j] ** 2 / den if den != 0 else 0.0
                w[k] += alpha * max(g[k, i, j], 0.0)
    return norm(relu(np.tensordot(w, a, axes=1)))


def xgradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    w = np.array([(a[k] / a[k].sum() * g[k]).sum() if a[k].sum() != 0 else 0.0 for k in range(K)])
    return norm(relu(np.tensordot(w, a, axes=1)))


def layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return norm(relu((relu(g) * a).sum(axis=0)))


def scorecam(a: np.ndarray, x: np.ndarray, c: int, probs: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Score-CAM with one masked forward per channel (constant channels included)."""
    base = probs(np.zeros((1, 3, H, W)))[0, c]
    w = np.array([probs((norm(a[k]) * x)[None])[0, c] - base for k in range(K)])
    return norm(relu(np.tensordot(w, a, axes=1)))


def amd(a: np.ndarray, g: np.ndarray, theta: float = 10.0) -> np.ndarray:
    cam = np.zeros((H, W))
    for k in range(K):
        t = np.percentile(g[k], theta)  # linear interpolation, NumPy's default
        wk = np.where(g[k] >= t, g[k], 0.0)
        pos = wk > 0
        total = wk[pos].sum()
        alpha = np.where(pos, 1.0 / total if total > 0 else 0.0, 0.0)
        cam += alpha * relu(wk) * a[k]
    return norm(cam)


def unioncam(a: np.ndarray, g: np.ndarray, x: np.ndarray, c: int,
             probs: Callable[[np.ndarray], np.ndarray]) -> dict[str, object]:
    """Equations 1 to 8, one image at a time."""
    base = probs(np.zeros((1, 3, H, W)))[0, c]
    l_den = amd(a, g)
    l_reg = scorecam(a, x, c, probs)
    beta_den = probs((l_den * x)[None])[0, c] - base
    beta_reg = probs((l_reg * x)[None])[0, c] - base
    l_dereg = norm(beta_den * l_den + beta_reg * l_reg)
    beta_dereg = probs((l_dereg * x)[None])[0, c] - base
    chose = beta_dereg > beta_reg
    return {"map": l_dereg if chose else l_reg, "l_den": l_den, "l_dereg": l_dereg,
            "beta_den": beta_den, "beta_reg": beta_reg, "beta_dereg": beta_dereg,
            "selected": "dereg" if chose else "region"}


@contextlib.contextmanager
def trainable(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with parameters that require grad (pytorch-grad-cam differentiates through them;
    unioncam.load freezes models), frozen again and without ``.grad`` afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.requires_grad_(True)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
