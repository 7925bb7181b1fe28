"""RefineCAM ("How to Evaluate and Refine your CAM", arXiv:2605.14641), as pytorch-grad-cam 1.5.7's
``RefineCAM`` computes it with its default base method, Grad-CAM++.

Each layer ``l`` of a set of layers gives a Grad-CAM++ map at the input's size, min-max normalized
(pytorch-grad-cam's ``GradCAMPlusPlus`` output: ``m_l = ψ(up(ψ(ReLU(Σ_k w_lk A_lk))))``, ``ψ`` its
``(m − min)/(max − min + 10⁻⁷)``); the map is their product ``ψ(Π_l m_l)``: a region survives only
where every layer, the coarse and the fine ones, marks it. One forward and one backward for all the
layers together (pytorch-grad-cam runs one of each per layer).

Grad-CAM++'s weights are pytorch-grad-cam's: ``w_k = Σ_ij α_kij ReLU(g_kij)``,
``α = g² / (2g² + Σ_ab A_ab · g³ + 10⁻⁶)``, 0 where ``g = 0``. (Our ``gradcampp`` has no ``10⁻⁶``.)

Layers (decision; neither library has a default, both take a list): ``layers=[...]`` names them
exactly. Otherwise the target layer (the model's default or ``target_layer``) and, for each of the
``levels − 1`` resolutions twice, four times, ... the target's (``levels = 3``), the last module to
finish with an output at that resolution, among the modules that run once per forward, finish before
the target layer, are not part of it, and are not inside a block whose output is coarser (the first
convolutions of a downsampling block), found by running the first image of the first call once. That
is the output of a stage: ``layer2`` and ``layer3`` for a ResNet explained at ``layer4``;
``_blocks.4`` and ``_blocks.10`` for EfficientNet-Lite0 at ``head_act``; ``features.1`` for
``tiny_cnn``; ``layers.0`` for a Swin explained in its second stage (through ``nhwc_to_nchw``). A
resolution no such module has is skipped, so a network
without finer maps (ViT: every block is 14×14) gets its target layer alone, which is then Grad-CAM++
(pytorch-grad-cam accepts one layer too). With a ``reshape``, a module's output counts through it (and
is skipped where the reshape refuses it), so a reshape that reads only some of a network's outputs can
pick a branch inside a block (Swin's tokens through ``vit_reshape(0)``: the last block's MLP branch,
its block outputs being ``B×H×W×C``); ``layers=[...]`` settles it.

TorchCAM 0.5.0's ``RefineCAM`` differs: (1) its default base, ``GradCAMpp``, divides α in place on a
boolean-mask copy (``alpha[idx][mask].div_(...)``), which leaves ``α = g²``; (2) it resizes the
per-layer maps to the largest layer's resolution, not the input's, before multiplying (the product of
upsampled maps is not the upsampled product); (3) its ``ψ`` adds ``10⁻⁸``; (4) it refuses fewer than
two layers. The two agree on the layers' set and on normalize-then-multiply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details, Explanation, Targets, eval_mode, find_layer
from unioncam.methods.gradient import weighted_sum
from unioncam.ops import min_max_eps, upsample

PGC_ALPHA_EPS = 1e-6  # pytorch-grad-cam's GradCAMPlusPlus
SCALE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def pgc_gradcampp_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """pytorch-grad-cam's Grad-CAM++ weights (``B×K``): ``Σ_ij α ReLU(g)``, ``α = g²/(2g² + ΣA·g³ + 10⁻⁶)``,
    0 where ``g = 0``."""
    g2 = grads.pow(2)
    alpha = g2 / (2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads + PGC_ALPHA_EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (grads.clamp_min(0) * alpha).sum(dim=(2, 3))


def stage_layers(model: nn.Module, probe: Tensor, target: nn.Module, levels: int,
                 reshape: object = None) -> list[nn.Module]:
    """The ends of the ``levels − 1`` stages before ``target`` at 2×, 4×, ... its resolution, then
    ``target`` (see the module docstring), by running ``probe`` once."""
    names = {m: n for n, m in model.named_modules()}
    modules = {n: m for m, n in names.items()}
    finished: list[tuple[nn.Module, tuple[int, int] | None]] = []

    def record(module: nn.Module, _inputs: tuple[Tensor, ...], output: object) -> None:
        size = None
        if isinstance(output, Tensor):
            try:
                grid = reshape(output) if callable(reshape) else output
            except (ValueError, RuntimeError, TypeError):  # a reshape that does not apply to this output
                grid = None
            if isinstance(grid, Tensor) and grid.dim() == 4 and grid.shape[0] == probe.shape[0]:
                size = (int(grid.shape[-2]), int(grid.shape[-1]))
        finished.append((module, size))

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad(), eval_mode(model):
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    runs: dict[nn.Module, int] = {}
    sizes: dict[nn.Module, tuple[int, int] | None] = {}
    for module, size in finished:
        runs[module] = runs.get(module, 0) + 1
        sizes.setdefault(module, size)
    at = [i for i, (module, _) in enumerate(finished) if module is target]
    if len(at) != 1 or finished[at[0]][1] is None:
        return [target]
    size = finished[at[0]][1]
    assert size is not None
    target_name = names[target]

    def ancestors(name: str) -> list[nn.Module]:
        parts = name.split(".")
        return [modules[".".join(parts[:n])] for n in range(1, len(parts))]

    def inside_a_resolution_change(name: str, res: tuple[int, int]) -> bool:
        """A module of a block that ends coarser than ``res`` (not one that holds the target)."""
        held = set(ancestors(target_name))
        for up in ancestors(name):
            out = sizes.get(up)
            if up not in held and out is not None and (out[0] < res[0] or out[1] < res[1]):
                return True
        return False

    chosen: list[nn.Module] = []
    for level in range(levels - 1, 0, -1):  # the finest first: execution order
        want = (size[0] * 2**level, size[1] * 2**level)
        found = [m for m, s in finished[: at[0]] if s == want and runs[m] == 1
                 and not names[m].startswith(target_name + ".") and not inside_a_resolution_change(names[m], want)]
        if found:
            chosen.append(found[-1])  # the last to finish: the stage's output
    return [*chosen, target]


class RefineCAM(CAM):
    """RefineCAM: ``ψ(Π_l ψ(up(Grad-CAM++_l)))`` over several layers. Options ``layers`` (names or
    modules; default the target layer and the ends of the earlier stages) and ``levels`` (3)."""

    name = "refinecam"
    class_targets = False  # any callable target: only the gradient of its score is used

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | None = None, *,
                 layers: Sequence[str | nn.Module] | None = None, levels: int = 3, **kwargs: object) -> None:
        if layers is not None and target_layer is not None:
            raise ValueError("refinecam: pass either target_layer (the coarsest layer; the finer ones are found) "
                             "or layers=[...] (all of them), not both")
        if layers is not None and not layers:
            raise ValueError("refinecam: layers is empty")
        if levels < 1:
            raise ValueError(f"refinecam: levels must be >= 1, got {levels}")
        self._explicit = list(layers) if layers is not None else None
        self.levels = int(levels)
        self._found = False
        super().__init__(model, target_layer, **kwargs)  # type: ignore[arg-type]

    def _resolve_layers(self, target_layer: str | nn.Module | None) -> list[nn.Module]:
        if self._explicit is not None:
            self._found = True
            return [find_layer(self.model, layer) for layer in self._explicit]
        return [find_layer(self.model, target_layer)]

    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation:
        if not self._found and not self._closed:  # the finer layers: found once, on the first image
            self.layers = stage_layers(self.model, self._check_images(images)[:1], self.layers[-1], self.levels,
                                       self.reshape)
            self._acts = [None] * len(self.layers)
            self._found = True
        return super().__call__(images, targets)

    def compute_layers(self, images: Tensor, targets: Tensor, acts: list[Tensor], grads: list[Tensor] | None,
                       logits: Tensor) -> tuple[Tensor, Details]:
        assert grads is not None
        size = (images.shape[-2], images.shape[-1])
        product: Tensor | None = None
        for a, g in zip(acts, grads, strict=True):
            low = min_max_eps(weighted_sum(pgc_gradcampp_weights(a, g), a), SCALE_EPS)
            layer_map = min_max_eps(upsample(low, size), SCALE_EPS)
            product = layer_map if product is None else product * layer_map
        assert product is not None
        return min_max_eps(product, SCALE_EPS), {}

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        raise NotImplementedError("RefineCAM multiplies several layers' maps: see compute_layers")
