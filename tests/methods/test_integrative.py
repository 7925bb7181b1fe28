"""Integrative CAM: Grad-CAM++ as a special case, and hand-built references for α, bias and fusion."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg16

import unioncam
from unioncam.methods.integrative import relu_after_conv_layers
from unioncam.models import PixelModel


@pytest.mark.parametrize("model_name", ["hand", "tiny_cnn"])
def test_reduces_to_gradcampp(model_name):
    if model_name == "hand":
        model, x, layer = ref.hand_model(), ref.hand_images(3), "act"
    else:
        model = unioncam.load("tiny_cnn").model
        x, layer = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "features.4"
    integ = unioncam.explain(model, x, "integrativecam", layers=[layer], bias=False, phi="exp")
    plus = unioncam.explain(model, x, "gradcampp", target_layer=layer)
    torch.testing.assert_close(integ.maps, plus.maps, atol=1e-6, rtol=0)


def test_softmax_phi_with_bias_matches_numpy():
    """One layer (HandNet's conv → ReLU): M = ReLU(Σ_k w_k A_k + Σ_k b_k g_k), α with softmax φ."""
    model, x = ref.hand_model(), ref.hand_images(3)
    r = ref.Reference(model)
    result = unioncam.explain(model, x, "integrativecam", phi="softmax")
    assert result.details["layers"] == ["net.act"]
    acts = r.acts(x)
    probs = r.probs(x.numpy())
    bias = model.net.conv.bias.detach().numpy()
    for i, c in enumerate(result.targets.tolist()):
        a, g, p = acts[i], r.grads(c), probs[i, c]
        d2 = p * (1 - p) * (1 - 2 * p)
        d3 = p * (1 - p) * (1 - 6 * p + 6 * p * p)
        w = np.zeros(ref.K)
        for k in range(ref.K):
            num = d2 * g[k] ** 2
            den = 2 * num + a[k].sum() * d3 * g[k] ** 3
            alpha = np.divide(num, den, out=np.zeros_like(den), where=den != 0)
            w[k] = (alpha * np.maximum(g[k], 0)).sum()
        cam = np.maximum(np.tensordot(w, a, axes=1) + np.tensordot(bias, g, axes=1), 0)
        np.testing.assert_allclose(result.maps[i].numpy(), ref.norm(cam), atol=1e-10)


def test_two_layer_fusion_matches_hand_split_network():
    """TinyCNN in float64, split by hand at both ReLUs; gradients from autograd without hooks."""
    model = unioncam.load("tiny_cnn").model.double()
    net = model.net
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = unioncam.explain(model, x, "integrativecam")
    assert result.details["layers"] == ["net.features.1", "net.features.4"]
    xn = (x - model.mean.double()) / model.std.double()
    a1 = torch.relu(net.features[0](xn)).detach().requires_grad_(True)
    a2 = torch.relu(net.features[3](net.features[2](a1)))
    a2_leaf = a2.detach().requires_grad_(True)
    logits = net.classifier(net.pool(a2_leaf).flatten(1))
    targets = logits.argmax(1)
    (g2,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a2_leaf)
    (g1,) = torch.autograd.grad(a2, a1, grad_outputs=g2)
    maps, energies = [], []
    for a, g, conv in ((a1.detach(), g1, net.features[0]), (a2.detach(), g2, net.features[3])):
        s = a.sum(dim=(2, 3), keepdim=True)
        den = 2 * g**2 + s * g**3
        alpha = torch.where(den != 0, g**2 / torch.where(den != 0, den, 1), 0)
        w = (alpha * g.clamp_min(0)).sum(dim=(2, 3))
        m = torch.relu((w[:, :, None, None] * a).sum(1) + (conv.bias.view(1, -1, 1, 1) * g).sum(1))
        m = F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        maps.append((m - lo) / (hi - lo))
        energies.append((g.clamp_min(0) * a).sum(1).mean((1, 2)) / a.shape[1])
    lam = torch.softmax(torch.stack(energies, 1), 1)
    fused = lam[:, 0, None, None] * maps[0] + lam[:, 1, None, None] * maps[1]
    lo, hi = fused.amin((1, 2), keepdim=True), fused.amax((1, 2), keepdim=True)
    assert result.targets.tolist() == targets.tolist()
    torch.testing.assert_close(result.details["layer_weights"], lam, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.maps, (fused - lo) / (hi - lo), atol=1e-10, rtol=0)


def test_default_layers_vgg16_and_shared_modules():
    found = relu_after_conv_layers(vgg16(weights=None).eval(), torch.zeros(1, 3, 32, 32))
    assert [f.name for f in found] == [f"features.{i}" for i in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)]

    class Shared(nn.Module):  # one ReLU object after two convs: ambiguous, so left out
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()
            self.c3, self.bn, self.act3 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act3(self.bn(self.c3(self.act(self.c2(self.act(self.c1(x)))))))
            return self.fc(x.mean((2, 3)))

    assert [f.name for f in relu_after_conv_layers(Shared().eval(), torch.zeros(1, 3, 16, 16))] == ["act3"]


def test_bias_through_batch_norm_and_bad_options():
    model = PixelModel(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (0,) * 3, (1,) * 3)
    bn = model.net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, 1.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.5, 0.0, -1.0, 0.2]))
    model.eval()
    with unioncam.get_method("integrativecam")(model) as cam:
        cam(torch.rand(1, 3, 8, 8))
        (entry,) = cam.entries
        from unioncam.methods.integrative import effective_bias

        expected = torch.tensor([0.5 - 2 * 0.1 / np.sqrt(1 + 1e-5), 0.2 / np.sqrt(4 + 1e-5),
                                 -1.0 - 0.3 / np.sqrt(0.25 + 1e-5), 0.2])
        torch.testing.assert_close(effective_bias(entry.conv, entry.bn), expected.float())
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="phi"):
        unioncam.explain(model, x, "integrativecam", phi="tanh")
    with pytest.raises(ValueError, match="does not directly follow a conv"):
        unioncam.explain(model, x, "integrativecam", layers=["3"])
