"""The fused inference copy (``load(..., fuse=True)``, :mod:`unioncam.models.fused`): BatchNorm folded into
the convolution before it by the hand-computed affine map, activations in place only where nothing else
reads their input, every method's maps unchanged, and the model itself runs whenever the copy could
differ (a hook, training mode, changed weights, a network fx cannot trace)."""

from __future__ import annotations

import logging

import pytest
import torch
from applicable import methods_for
from torch import Tensor, nn

import unioncam
from unioncam.models import load
from unioncam.models.fused import FuseError, fuse


def _randomize_bn(net: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters and running statistics, so a fold is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
    return net.eval()


class BNNet(nn.Module):
    """Conv-BN-ReLU twice (the ReLUs not in place), global pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def bn_net(fuse_: bool, dtype: torch.dtype = torch.float64) -> unioncam.LoadedModel:
    torch.manual_seed(0)
    lm = load(_randomize_bn(BNNet(), 1), target_layer="features.6", input_size=32, fuse=fuse_)
    lm.model.to(dtype)
    return lm


def test_fold_is_the_hand_computed_affine_map():
    """conv w=2, b=1; BN γ=3, β=0.5, μ=1, σ²=3, ε=1: s = 3/√4 = 1.5, W' = 3, b' = (1 − 1)·1.5 + 0.5 = 0.5."""
    conv, bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.weight.fill_(3.0)
        bn.bias.fill_(0.5)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)
    fused = fuse(nn.Sequential(conv, bn).eval())
    assert len(fused.pairs) == 1 and fused.pairs[0] == (conv, bn)
    folded = [m for m in fused.module.modules() if isinstance(m, nn.Conv2d)]
    assert len(folded) == 1 and folded[0] is not conv  # the network's own convolution is left as it was
    assert folded[0].weight.item() == 3.0 and folded[0].bias.item() == 0.5
    assert conv.weight.item() == 2.0 and conv.bias.item() == 1.0
    x = torch.tensor([[[[4.0]]]])
    assert fused.module(x).item() == 12.5  # 3·4 + 0.5 = ((2·4 + 1) − 1) / 2 · 3 + 0.5


@pytest.fixture(scope="module")
def nets():
    return bn_net(False), bn_net(True)


def test_every_method_gives_the_same_maps_through_the_fused_copy(nets):
    """Each method's grad-free passes run through the copy, its hooked ones (Ablation-CAM, SmoothGrad-CAM++)
    through the model: the float64 maps agree to rounding. An ablation hook the copy skipped, or a
    folded BatchNorm in the gradient path, would move them far more."""
    plain, fused = nets
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    methods = methods_for(bn_net(False, torch.float32))  # check_model runs a float32 dry forward
    assert {"scorecam", "ablationcam", "sscam", "unioncam", "gradcam"} <= set(methods)
    copy = fused.model.fused()
    assert copy is not None and len(copy.pairs) == 2 and copy.inplace == 2
    assert plain.model.fused() is None
    calls: list[int] = []
    handle = copy.module.register_forward_hook(lambda *_: calls.append(1))  # the copy's, not the network's
    try:
        for method in methods:
            a, b = unioncam.explain(plain, x, method), unioncam.explain(fused, x, method)
            assert torch.equal(a.targets, b.targets), method
            torch.testing.assert_close(b.maps, a.maps, atol=1e-9, rtol=0, msg=method)
    finally:
        handle.remove()
    assert fused.model.fused() is copy and len(calls) > 100  # the masked forwards ran through it


def _through_copy(model: unioncam.models.PixelModel, x: Tensor) -> tuple[Tensor, int]:
    """The model's inference-mode output and how often the fused copy ran for it."""
    copy = model.fused()
    calls = []
    handle = copy.module.register_forward_hook(lambda *_: calls.append(1)) if copy is not None else None
    try:
        with torch.inference_mode():
            return model(x), len(calls)
    finally:
        if handle is not None:
            handle.remove()


def test_a_hook_on_the_network_runs_the_model_itself(nets):
    _, lm = nets
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected, n = _through_copy(lm.model, x)
    assert n == 1
    seen = []
    bn = lm.model.net.features[5]  # folded away in the copy
    handle = bn.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        assert lm.model.fused() is None
        out, n = _through_copy(lm.model, x)
    finally:
        handle.remove()
    assert n == 0 and seen == [(2, 16, 16, 16)]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # a hook that changes the output (as Ablation-CAM's does) changes the result
    relu = lm.model.net.features[6]  # replaced by an in-place copy in the fused one
    handle = relu.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        zeroed, n = _through_copy(lm.model, x)
    finally:
        handle.remove()
    assert n == 0
    torch.testing.assert_close(zeroed, lm.model.net.classifier.bias.expand(2, -1))
    assert lm.model.fused() is not None


def test_changed_weights_rebuild_the_copy():
    lm = bn_net(True)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _through_copy(lm.model, x)
    first = lm.model.fused()
    bn = lm.model.net.features[1]
    with torch.no_grad():
        bn.running_var.mul_(4.0)  # in place: the version moves
    assert not first.current(lm.model.net)
    out, n = _through_copy(lm.model, x)
    assert n == 1 and lm.model.fused() is not first
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x), atol=1e-12, rtol=0)  # grad mode: the model itself
    other = _randomize_bn(BNNet(), 7).double()
    lm.model.net.load_state_dict(other.state_dict())
    out, _ = _through_copy(lm.model, x)
    with torch.no_grad():
        expected = other((x - lm.model.mean.double()) / lm.model.std.double())
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    lm.model.float()  # new storage for every tensor
    out, n = _through_copy(lm.model, x.float())
    assert n == 1 and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x.float()), atol=1e-5, rtol=0)


def test_training_mode_runs_the_model_itself():
    lm = bn_net(True)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    _through_copy(lm.model, x)
    lm.model.net.features[5].train()
    assert lm.model.fused() is None
    lm.model.net.features[5].eval()
    assert lm.model.fused() is not None
    # a model first used in training mode gets its copy, with every fold, once it is in eval mode
    other = bn_net(True)
    other.model.train()
    assert other.model.fused() is None
    other.model.eval()
    copy = other.model.fused()
    assert copy is not None and len(copy.pairs) == 2


class Branchy(nn.Module):
    """A conv whose output feeds BN and a residual add, a ReLU reading the input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.first = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.first(x))
        return self.act(self.bn(y)) + y + x


class StdConv(nn.Conv2d):
    """Weight standardization: a fold scales W, which standardization undoes."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class BNAct(nn.BatchNorm2d):
    """A normalization with its activation inside (as timm's BatchNormAct2d)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


def test_only_provable_folds_and_inplace_activations():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    # Branchy: the conv's output is read twice (not folded), the BN's once (its ReLU in place), the
    # input's ReLU is left alone (it would overwrite the caller's tensor)
    for net, pairs, inplace in ((Branchy(), 0, 1),
                                (nn.Sequential(StdConv(4, 4, 3), nn.BatchNorm2d(4)), 0, 0),
                                (nn.Sequential(nn.Conv2d(4, 4, 3), BNAct(4)), 0, 0),
                                (nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()), 1, 1)):
        net = _randomize_bn(net, 8)
        fused = fuse(net)
        assert (len(fused.pairs), fused.inplace) == (pairs, inplace), type(net).__name__
        before = x.clone()
        with torch.inference_mode():
            torch.testing.assert_close(fused.module(x), net(x), atol=1e-5, rtol=0)
        assert torch.equal(x, before)  # the input is never overwritten


class Aliased(nn.Module):
    """A ReLU reads a view (Flatten's output) of a tensor the network reads again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.flat = nn.Flatten()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.act(self.flat(y)) + y.flatten(1)


def test_an_activation_of_a_view_is_not_made_in_place():
    net = Aliased().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    fused = fuse(net)
    assert fused.inplace == 0
    with torch.inference_mode():
        torch.testing.assert_close(fused.module(x), net(x), atol=1e-6, rtol=0)


def test_a_global_hook_runs_the_model_itself(nets):
    _, lm = nets
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert lm.model.fused() is None
        _, n = _through_copy(lm.model, x)
    finally:
        handle.remove()
    assert n == 0 and lm.model.fused() is not None


def test_a_changed_module_tree_or_network_rebuilds_the_copy():
    lm = bn_net(True)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    first = lm.model.fused()
    lm.model.net.classifier = nn.Linear(16, 10).double().eval()  # a new module in the tree
    out, n = _through_copy(lm.model, x)
    assert n == 1 and lm.model.fused() is not first
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x), atol=1e-12, rtol=0)
    other = _randomize_bn(BNNet(), 12).double()
    lm.model.net = other  # another network
    out, _ = _through_copy(lm.model, x)
    assert lm.model.fused().pairs[0][1] is other.features[1]
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x), atol=1e-12, rtol=0)


class Scaled(nn.Module):
    """A buffer of a module the trace goes through (read as an attribute), and dropout in training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.dropout(self.conv(x), 0.5, self.training) * self.scale
        return self.fc(y.mean(dim=(2, 3)))


def test_moves_and_training_mode_are_followed():
    lm = load(Scaled(), target_layer="conv", input_size=16, class_names=["a", "b", "c"], fuse=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    lm.model.train()  # the trace would fix dropout on
    assert lm.model.fused() is None
    lm.model.eval()
    out, n = _through_copy(lm.model, x)
    assert n == 1
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x))
    lm.model.double()  # the buffer the copy holds is replaced
    lm.model.net.scale.fill_(3.0)
    out, n = _through_copy(lm.model, x.double())
    assert n == 1 and out.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x.double()), atol=1e-12, rtol=0)


def test_a_copy_first_built_under_autocast_folds_every_pair():
    lm = bn_net(True, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        copy = lm.model.fused()
    assert copy is not None and len(copy.pairs) == 2


def test_networks_a_copy_cannot_follow_are_not_fused(caplog):
    class Remembers(BNNet):
        def forward(self, x: Tensor) -> Tensor:
            self.last = self.features(x)  # read back by someone after the forward
            return self.classifier(self.pool(self.last).flatten(1))

    class Appends(BNNet):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[str, list[Tensor]] = {"features": []}

        def forward(self, x: Tensor) -> Tensor:
            f = self.features(x)
            self.seen["features"].append(f)  # a side effect inside a container
            return self.classifier(self.pool(f).flatten(1))

    net = _randomize_bn(Remembers(), 14)
    with pytest.raises(FuseError, match="forward stores values in the network"):
        fuse(net)
    assert "last" not in net.__dict__  # the trace ran on a copy: nothing is left behind
    appends = _randomize_bn(Appends(), 16)
    with pytest.raises(FuseError, match="forward stores values"):
        fuse(appends)
    assert appends.seen == {"features": []}
    with torch.inference_mode():
        frozen = _randomize_bn(BNNet(), 15)  # weights made under inference mode
    with pytest.raises(FuseError, match="inference tensors"):
        fuse(frozen)
    lm = load(net, target_layer="features.6", input_size=32, fuse=True)
    with caplog.at_level(logging.WARNING, logger="unioncam.models.base"):
        _, n = _through_copy(lm.model, torch.rand(1, 3, 32, 32))
    assert n == 0 and any("stores values" in r.getMessage() for r in caplog.records)
    assert isinstance(net.last, Tensor)  # the network itself ran


class Constant(BNNet):
    """A tensor made in ``forward`` (fx keeps it as a constant of the copy, not of the network)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * torch.tensor([2.0], dtype=x.dtype))


def test_constants_and_parametrized_convolutions():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(17))
    net = _randomize_bn(Constant(), 18)
    fused = fuse(net)
    assert len(fused.pairs) == 2 and not hasattr(net, "_tensor_constant0")
    with torch.inference_mode():
        torch.testing.assert_close(fused.module(x), net(x), atol=1e-5, rtol=0)
    normed = _randomize_bn(BNNet(), 19)
    nn.utils.parametrizations.weight_norm(normed.features[0])  # its weight is computed at each call
    fused = fuse(normed)
    assert [bn for _, bn in fused.pairs] == [normed.features[5]]  # the parametrized pair is left alone
    with torch.inference_mode():
        torch.testing.assert_close(fused.module(x), normed(x), atol=1e-5, rtol=0)
    lm = load(normed, target_layer="features.6", input_size=32, fuse=True)
    assert unioncam.explain(lm, x, "scorecam").maps.shape == (2, 32, 32)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if y.mean() > 0:  # fx cannot trace a branch on a value
            y = -y
        return self.fc(y.mean(dim=(2, 3)))


def test_untraceable_network_runs_as_it_is_with_one_warning(caplog):
    net = _randomize_bn(DataDependent(), 9)
    with pytest.raises(FuseError, match=r"torch\.fx cannot trace DataDependent"):
        fuse(net)
    lm = load(net, target_layer="bn", input_size=16, class_names=["a", "b", "c"], fuse=True)
    x = torch.rand(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="unioncam.models.base"), torch.inference_mode():
        out = lm.model(x)
        lm.model(x)
    warnings = [r.getMessage() for r in caplog.records if "cannot trace" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].endswith("its forwards run unfused")
    with torch.no_grad():
        torch.testing.assert_close(out, lm.model(x))
    assert unioncam.explain(lm, x, "scorecam").maps.shape == (2, 16, 16)


skimage = pytest.importorskip("skimage")


def test_lite0_fused_on_real_photos():
    """The real EfficientNet-Lite0: 49 conv+BN pairs folded (its "same" convolutions kept whole), 33
    ReLU6 in place; the logits of real photos agree to fp32 rounding and the grad-free forwards of a
    method go through the copy."""
    from pathlib import Path

    from unioncam.viz import load_image

    data = Path(skimage.__file__).parent / "data"
    plain = load("efficientnet_lite0", input_size=96, channels_last=True)
    lm = load("efficientnet_lite0", input_size=96, channels_last=True, fuse=True)
    x = torch.stack([load_image(data / n, lm.input_size) for n in ("chelsea.png", "coffee.png")])
    out, n = _through_copy(lm.model, x)
    copy = lm.model.fused()
    assert n == 1 and copy is not None and (len(copy.pairs), copy.inplace) == (49, 33)
    with torch.inference_mode():
        expected = plain.model(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    calls = []
    handle = copy.module.register_forward_hook(lambda *_: calls.append(1))
    try:
        a = unioncam.explain(plain, x, "scorecam", batch_size=32, precision="fp32")
        b = unioncam.explain(lm, x, "scorecam", batch_size=32, precision="fp32")
    finally:
        handle.remove()
    assert len(calls) > 10  # Score-CAM's masked forwards
    torch.testing.assert_close(b.maps, a.maps, atol=1e-4, rtol=0)
