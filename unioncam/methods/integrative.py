"""Integrative CAM (Singh et al.), as REFERENCE.md reads its abstract.

For each layer ``l`` (default: the output of every ReLU that directly follows a conv, possibly
through a batch norm):

* generalized α for a smooth output ``Y = φ(S_c)`` (:func:`generalized_alpha`),
* bias term ``B_l = Σ_k b_k g_k`` with ``b_k`` the bias of the conv (and batch norm) producing
  channel ``k`` (:func:`bias_map`),
* layer map ``M_l = ReLU(Σ_k w_k A_k + B_l)``, ``w_k = Σ_ij α_kij ReLU(g_kij)``,
* layer weight ``λ = softmax_l(e_l)``, ``e_l = mean_ij Σ_k ReLU(g_k) ⊙ A_k / K_l`` (:func:`layer_weights`),

and the output ``norm(Σ_l λ_l · norm(up(M_l)))``. With ``layers=[target_layer]``, ``bias=False``
and ``phi="exp"`` this is Grad-CAM++ exactly (φ'' = φ''' = e^S cancel in α).

Decisions of ours (docs/reference-notes.md): ``w_k`` uses ``ReLU(g)`` rather than
``ReLU(φ'(S)·g)``: ``φ' > 0`` for both φ, so this only rescales ``M_l`` by a positive constant
per image (and the bias term with it), which the per-layer normalization removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details, Explanation, Targets, eval_mode, find_layer, model_name
from unioncam.ops import normalize, safe_divide, upsample

Phi = Literal["exp", "softmax"]
PHIS: tuple[str, ...] = ("exp", "softmax")
_RELUS = (nn.ReLU, nn.ReLU6)


def phi_derivatives(phi: Phi, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(φ''(S_c), φ'''(S_c))`` per image for ``Y = φ(S_c)``.

    ``exp``: both ``e^{S_c}``. ``softmax``: ``p = softmax(S)_c`` as a function of ``S_c`` has
    ``p' = p(1−p)``, ``p'' = p(1−p)(1−2p)``, ``p''' = p(1−p)(1−6p+6p²)``.
    """
    s = logits.gather(1, targets[:, None])[:, 0]
    if phi == "exp":
        e = torch.exp(s - s.detach().max())  # a common positive factor; it cancels in α
        return e, e
    if phi == "softmax":
        p = logits.softmax(-1).gather(1, targets[:, None])[:, 0]
        d1 = p * (1 - p)
        return d1 * (1 - 2 * p), d1 * (1 - 6 * p + 6 * p * p)
    raise ValueError(f"unknown phi {phi!r}; valid: {', '.join(PHIS)}")


def generalized_alpha(acts: Tensor, grads: Tensor, d2: Tensor, d3: Tensor) -> Tensor:
    """``α = φ''g² / (2φ''g² + Σ_ab A_ab φ''' g³)`` (0 where the denominator is 0)."""
    d2 = d2.view(-1, 1, 1, 1)
    d3 = d3.view(-1, 1, 1, 1)
    num = d2 * grads.pow(2)
    denom = 2 * num + acts.sum(dim=(2, 3), keepdim=True) * d3 * grads.pow(3)
    return safe_divide(num, denom)


def effective_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Tensor:
    """Per-channel bias reaching the ReLU: the conv's bias, passed through the batch norm (eval)
    if there is one: ``γ (b − μ) / √(σ² + ε) + β``."""
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)
    if bn is None:
        return b.detach()
    scale = (bn.weight if bn.weight is not None else 1) / torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator,arg-type]
    shift = bn.bias if bn.bias is not None else 0
    return (scale * (b - bn.running_mean) + shift).detach()  # type: ignore[operator]


def bias_map(bias: Tensor, grads: Tensor) -> Tensor:
    """``B_l = Σ_k b_k · g_k``: the bias's share of the class score at each position, ``B×h×w``."""
    return torch.einsum("k,bkhw->bhw", bias.to(grads.dtype), grads)


def layer_map(acts: Tensor, grads: Tensor, d2: Tensor, d3: Tensor, bias: Tensor | None) -> Tensor:
    """``M_l = ReLU(Σ_k w_k A_k + B_l)`` with ``w_k = Σ_ij α_kij ReLU(g_kij)``."""
    w = (generalized_alpha(acts, grads, d2, d3) * grads.clamp_min(0)).sum(dim=(2, 3))
    cam = torch.einsum("bk,bkhw->bhw", w, acts)
    if bias is not None:
        cam = cam + bias_map(bias, grads)
    return cam.clamp_min(0)


def layer_weights(acts: list[Tensor], grads: list[Tensor]) -> Tensor:
    """``λ = softmax_l(mean_ij Σ_k ReLU(g_k) ⊙ A_k / K_l)``, ``B×L``."""
    energy = torch.stack([(g.clamp_min(0) * a).sum(1).mean(dim=(1, 2)) / a.shape[1]
                          for a, g in zip(acts, grads, strict=True)], dim=1)
    return energy.softmax(dim=1)


@dataclass(frozen=True)
class ConvReLU:
    """A ReLU layer that directly follows a conv (and optionally a batch norm) in execution."""

    name: str
    relu: nn.Module
    conv: nn.Conv2d | None
    bn: nn.BatchNorm2d | None


def relu_after_conv_layers(model: nn.Module, probe: Tensor) -> list[ConvReLU]:
    """Find, by running ``probe`` once, every ReLU/ReLU6 whose input came straight from a conv
    (or conv → batch norm), in execution order (a conv subclass with child modules, such as
    EfficientNet's same-padding conv, counts as a conv). Modules run more than once per forward (a shared
    activation, as in EfficientNet-Lite's blocks) are left out: their output is ambiguous."""
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []  # modules in the order their forward completes
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    counts = {m: order.count(m) for m in set(order)}
    found: list[ConvReLU] = []
    for i, m in enumerate(order):
        if not isinstance(m, _RELUS) or counts[m] != 1 or i == 0:
            continue
        prev = order[i - 1]
        bn = prev if isinstance(prev, nn.BatchNorm2d) else None
        conv = order[i - 2] if bn is not None and i >= 2 else prev
        if isinstance(conv, nn.Conv2d):
            found.append(ConvReLU(names[m], m, conv, bn))
    return found


class IntegrativeCAM(CAM):
    """Integrative CAM. Options: ``layers`` (module names; default every ReLU after a conv),
    ``bias`` (add ``B_l``, default True), ``phi`` ("exp" or "softmax").

    It fuses several layers of its own choosing, so it takes no ``target_layer``: passing one
    raises ``ValueError`` (it used to be ignored silently). To explain one layer, pass
    ``layers=[name]`` (with ``bias=False`` and ``phi="exp"`` that is Grad-CAM++ at that layer).
    The model's default ``target_layer`` attribute is not read either.

    Details: ``layer_weights`` (``B×L`` tensor of λ) and ``layers`` (their names).
    """

    name = "integrativecam"

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None, *,
                 layers: list[str] | None = None, bias: bool = True, phi: Phi = "exp", **kwargs: object) -> None:
        if target_layer is not None:
            shown = target_layer if isinstance(target_layer, str) else type(target_layer).__name__
            raise ValueError(f"integrativecam reads its own layers (every ReLU after a conv) and takes no "
                             f"target_layer (got {shown!r}); pass layers=[...] to choose them")
        if phi not in PHIS:
            raise ValueError(f"unknown phi {phi!r}; valid: {', '.join(PHIS)}")
        self.phi: Phi = phi
        self.use_bias = bias
        self._layer_names = layers
        self.entries: list[ConvReLU] | None = None
        super().__init__(model, target_layer, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def check_model(cls, model: nn.Module, target_layer: str | nn.Module | None = None,
                    input_size: tuple[int, int] | None = None) -> None:
        """Refuse, in one line, a model with no ReLU directly after a convolution (ConvNeXt's GELUs,
        a ViT): its default layers, found by :func:`relu_after_conv_layers` on one random image of
        ``input_size`` (224×224 by default), would be none."""
        size = input_size or (224, 224)
        param = next(iter(model.parameters()), None)
        probe = torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(0))
        with eval_mode(model):
            found = relu_after_conv_layers(model, probe.to(param.device if param is not None else "cpu"))
        if not found:
            raise ValueError(f"{cls.name}: model {model_name(model)} has no ReLU directly after a convolution, so "
                             "Integrative CAM has no layers to integrate; pass layers=[...] in the library")

    def _resolve_layers(self, target_layer: str | nn.Module | None) -> list[nn.Module]:
        """Layers are found on the first call, by running its first image (see
        :func:`relu_after_conv_layers`), so any input size the model accepts works."""
        return []

    def _discover(self, probe: Tensor) -> list[ConvReLU]:
        with eval_mode(self.model):
            found = relu_after_conv_layers(self.model, probe)
        if self._layer_names is None:
            if not found:
                raise ValueError("no ReLU directly after a conv found; pass layers=[...] explicitly")
            return found
        by_module = {f.relu: f for f in found}
        chosen = []
        for name in self._layer_names:
            module = find_layer(self.model, name)
            if module not in by_module and self.use_bias:
                raise ValueError(f"layer {name!r} does not directly follow a conv, so it has no bias "
                                 "term; pick a ReLU after a conv or pass bias=False")
            chosen.append(by_module.get(module) or ConvReLU(name, module, None, None))
        return chosen

    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation:
        if self.entries is None and not self._closed:
            self.entries = self._discover(self._check_images(images)[:1])
            self.layers = [e.relu for e in self.entries]
        return super().__call__(images, targets)

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None and self.entries is not None
        size = (images.shape[-2], images.shape[-1])
        d2, d3 = phi_derivatives(self.phi, logits, targets)
        maps = []
        for entry, a, g in zip(self.entries, acts, grads, strict=True):
            maps.append(normalize(upsample(layer_map(a, g, d2, d3, self._bias(entry)), size)))
        lam = layer_weights(acts, grads)
        fused = torch.einsum("bl,blhw->bhw", lam, torch.stack(maps, dim=1))
        return fused, {"layer_weights": lam, "layers": [e.name for e in self.entries]}

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        """Not used: Integrative CAM reads several layers, so the pipeline calls :meth:`compute_layers`.
        Defined only because :meth:`CAM.compute` is abstract; a per-layer map is :func:`layer_map`."""
        raise NotImplementedError("IntegrativeCAM fuses several layers: it implements compute_layers, not compute "
                                  "(use unioncam.methods.integrative.layer_map for one layer's map)")

    def _bias(self, entry: ConvReLU) -> Tensor | None:
        """The layer's per-channel bias when the bias term is on and a conv produced the layer."""
        return effective_bias(entry.conv, entry.bn) if self.use_bias and entry.conv is not None else None
