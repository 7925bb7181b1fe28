"""The model parameter randomization test, cascading (Adebayo et al., 2018, "Sanity Checks for
Saliency Maps", NeurIPS, §3.1; quantus 0.6.0's ``MPRT`` with ``layer_order="top_down"``).

The parameterized layers are re-initialized one after another from the logits down, on a deep copy
of the model: after step ``k`` the last ``k`` layers are all random. Each method's maps on the
randomized model are compared with its maps on the original model, per image, by the Spearman rank
correlation (:func:`spearman`) and the SSIM (:func:`ssim`). A method whose maps depend on the
learned weights loses its similarity as the cascade goes down; a model-independent one, such as the
edge detector (:class:`EdgeDetector`, the paper's control), stays at 1.

Conventions:
    * Layers: every module with a ``reset_parameters`` method, in reverse ``named_modules()``
      order, re-initialized by that method (exactly quantus' ``get_random_layer_generator``).
      Parameters held outside such modules (a ViT's ``cls_token``/``pos_embed``, LayerScale) are
      not randomized, as in quantus. For torchvision/timm CNNs the registration order is the
      forward order.
    * Seeds: layer ``i`` of the cascade (0 = the logits' layer) is reset with torch's CPU
      generator seeded by :func:`layer_seed` (``"distinct"``: a seed per layer from
      ``SeedSequence([seed, i])``; ``"quantus"``: ``seed + 1`` for every layer, quantus' convention,
      so the weights equal quantus' bit for bit). The draw runs on a CPU copy of the layer, so the
      weights are the same on every device; the caller's RNG state is left as it was.
    * Targets: the classes explained are fixed to those of the original model (given by the caller,
      or the original model's predictions); they are not re-predicted on the randomized models.

Against quantus 0.6.0 (tests/evaluation/test_sanity.py runs it side by side): with ``seeding="quantus"`` the
layer names, order and re-initialized weights are identical, and so are the Spearman values per
layer and image. Its MPRT differs elsewhere: it flattens the maps before its ``similarity_func``
(so ``similarity_func=quantus.ssim`` would be a 1-D SSIM along raster rows, and its batched ssim
returns a list that MPRT cannot take: an AttributeError); a constant map anywhere in a batch makes
SciPy's batched ``spearmanr`` return one NaN and MPRT fail, and it reseeds the global RNG.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unioncam.engine import model_device, predict
from unioncam.methods import get_method
from unioncam.methods.base import Explanation, Targets, find_layer
from unioncam.models import LoadedModel, PixelModel
from unioncam.ops import chunks, normalize

Seeding = Literal["distinct", "quantus"]
ORIGINAL = "original"  # the name of step 0: nothing randomized (quantus' "original" key)
LayerSelection = int | Sequence[str | nn.Module] | None


class Explainer(Protocol):
    """What :func:`sanity_check` runs: a :class:`~unioncam.methods.base.CAM` or any object called as
    ``explainer(images, targets) -> Explanation``, whose ``model`` attribute is the model it explains
    (None for a model-independent control)."""

    @property
    def model(self) -> nn.Module | None: ...

    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation: ...


Methods = Sequence[str] | Mapping[str, "Explainer | Callable[[nn.Module], Explainer]"]


# -- similarities ---------------------------------------------------------------------------------
def _check_pair(a: Tensor, b: Tensor, dims: int | None = None) -> None:
    if a.shape != b.shape or a.dim() < 2 or (dims is not None and a.dim() != dims):
        want = "B×H×W" if dims == 3 else "B×..."
        raise ValueError(f"a and b must be two {want} batches of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dimension, tied values sharing their average rank (float64),
    as ``scipy.stats.rankdata(method="average")``: in sorted order a tie group at positions
    ``s … e`` gets ``(s + e) / 2 + 1``."""
    n = x.shape[-1]
    values, order = x.sort(dim=-1, stable=True)
    pos = torch.arange(n, device=x.device).expand_as(values)
    first = torch.ones_like(values, dtype=torch.bool)
    first[..., 1:] = values[..., 1:] != values[..., :-1]
    last = torch.ones_like(first)
    last[..., :-1] = first[..., 1:]
    start = torch.where(first, pos, 0).cummax(dim=-1).values
    end = torch.where(last, pos, n).flip(-1).cummin(dim=-1).values.flip(-1)
    avg = (start + end).to(torch.float64) / 2 + 1
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps ``a[i]``, ``b[i]`` (flattened), batched.

    ``ρ = Σ (r_a − r̄_a)(r_b − r̄_b) / √(Σ (r_a − r̄_a)² · Σ (r_b − r̄_b)²)``: the Pearson
    correlation of the ranks, ties given their average rank; equal to ``scipy.stats.spearmanr``
    (Adebayo et al.'s and quantus' ``correlation_spearman``). Computed in float64 on the maps'
    device; returned in ``a``'s floating dtype.

    Constant maps, where SciPy returns NaN: ``ρ = 1`` when both maps are constant (their ranks
    are identical: every pixel tied), ``ρ = 0`` when only one is (no rank association). A pair with
    a NaN or infinite value gives NaN.

    Args:
        a, b: ``B×…`` maps of the same shape (``B×H×W`` for CAM maps).
    Returns:
        ``B`` correlations in ``[−1, 1]``.
    """
    _check_pair(a, b)
    x, y = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx = rx - rx.mean(dim=1, keepdim=True)
    ry = ry - ry.mean(dim=1, keepdim=True)
    rho = (rx * ry).sum(1) / ((rx * rx).sum(1) * (ry * ry).sum(1)).sqrt()
    const_x, const_y = (x == x[:, :1]).all(1), (y == y[:, :1]).all(1)
    rho = torch.where(const_x & const_y, 1.0, torch.where(const_x | const_y, 0.0, rho.clamp(-1, 1)))
    finite = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    rho = torch.where(finite, rho, torch.nan)
    return rho.to(a.dtype if a.is_floating_point() else torch.float32)


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7, k1: float = 0.01, k2: float = 0.03,
         data_range: float | None = None) -> Tensor:
    """Mean structural similarity (Wang et al., 2004) of each pair of maps ``a[i]``, ``b[i]``, batched.

    Equal to ``skimage.metrics.structural_similarity(a[i], b[i], data_range=R)`` with skimage's
    defaults, the settings of quantus' ``similarity_func.ssim`` (which the MPRT uses for Adebayo et
    al.'s SSIM): a ``7×7`` uniform window, ``K1 = 0.01``, ``K2 = 0.03``, sample covariances
    (``N/(N−1)``, ``N = 49``), and ``R = max(a_i, b_i) − min(a_i, b_i)`` over both maps together
    (quantus' data range; 1 for two min-max normalized maps). Per window,

        ``S = (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))``,
        ``C1 = (K1 R)²``, ``C2 = (K2 R)²``,

    and the result is the mean of ``S`` over the windows lying wholly inside the map (skimage crops
    ``(win_size − 1) / 2`` pixels at each border, so its padding never counts). Computed in float64
    on the maps' device with ``avg_pool2d``; returned in ``a``'s floating dtype.

    ``R = 0`` (both maps constant and equal; skimage gives NaN) gives 1: the maps are identical. A
    pair with a NaN or infinite value gives NaN.

    Args:
        a, b: ``B×H×W`` maps, ``H, W >= win_size``.
        data_range: ``R`` for every pair (None: per pair, as above).
    """
    _check_pair(a, b, 3)
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"maps of {tuple(a.shape[-2:])} are smaller than the {win_size}×{win_size} window")
    x, y = a.to(torch.float64)[:, None], b.to(torch.float64)[:, None]
    if data_range is None:
        r = torch.maximum(x.amax((1, 2, 3)), y.amax((1, 2, 3))) - torch.minimum(x.amin((1, 2, 3)), y.amin((1, 2, 3)))
    else:
        r = torch.full((x.shape[0],), float(data_range), dtype=torch.float64, device=x.device)
    c1, c2 = ((k1 * r) ** 2).view(-1, 1, 1), ((k2 * r) ** 2).view(-1, 1, 1)

    n = win_size * win_size
    cov_norm = n / (n - 1)
    ux, uy, uxx, uyy, uxy = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], 1), win_size, stride=1).unbind(1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = torch.where(r == 0, 1.0, s.mean((1, 2)))
    finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1)
    out = torch.where(finite, out, torch.nan)
    return out.to(a.dtype if a.is_floating_point() else torch.float32)


# -- the cascade ----------------------------------------------------------------------------------
def parameterized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module with a ``reset_parameters`` method, from the logits down:
    ``named_modules()`` reversed, as quantus' ``get_random_layer_generator(order="top_down")``
    (names as ``model.named_modules()`` gives them, ``net.…`` inside a :class:`PixelModel`)."""
    found = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "reset_parameters", None))]
    return found[::-1]


def layer_seed(seed: int, index: int, seeding: Seeding = "distinct") -> int:
    """The seed that re-initializes layer ``index`` of the cascade (0: the first, at the logits).

    ``"distinct"``: ``SeedSequence([seed, index]).generate_state(1)[0]`` (NumPy), a well-mixed
    32-bit seed per layer, so equal-shaped layers get different weights and a layer's weights do not
    depend on which steps are evaluated. ``"quantus"``: ``seed + 1`` for every layer, what quantus
    0.6.0's generator calls ``torch.manual_seed`` with before each ``reset_parameters()``.
    """
    if seeding == "quantus":
        return seed + 1
    if seeding != "distinct":
        raise ValueError(f"seeding must be 'distinct' or 'quantus', got {seeding!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def reinitialize(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` in place, with torch's CPU generator seeded by ``seed``.

    For a module off the CPU the reset runs on a CPU copy, which is then loaded into the module, so
    the weights do not depend on the device (a CUDA reset would draw from CUDA's generator). The
    CPU generator's state is restored afterwards (``torch.random.fork_rng``); no other generator is
    touched.
    """
    on_cpu = all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if on_cpu:
            module.reset_parameters()  # type: ignore[operator]
        else:
            twin = copy.deepcopy(module).cpu()
            twin.reset_parameters()  # type: ignore[operator]
            module.load_state_dict(twin.state_dict())


def cascade_steps(model: nn.Module, layers: LayerSelection) -> list[int]:
    """The cascade indices after which the maps are compared (0-based, ascending).

    None: every layer. An int ``k``: every ``k``-th (indices ``k−1, 2k−1, …``) and always the last,
    the fully randomized model. Names (or modules) of parameterized layers, as
    :func:`parameterized_layers` gives them or relative to a :class:`PixelModel`'s ``net``.
    """
    plan = parameterized_layers(model)
    if not plan:
        raise ValueError("the model has no layer with reset_parameters() to randomize")
    if layers is None:
        return list(range(len(plan)))
    if isinstance(layers, bool):
        raise TypeError("layers must be None, an int (every k-th) or layer names")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers (every k-th) must be >= 1, got {layers}")
        return sorted({*range(layers - 1, len(plan), layers), len(plan) - 1})
    if isinstance(layers, str | nn.Module):
        layers = [layers]
    by_name = {name: i for i, (name, _) in enumerate(plan)}
    by_module = {id(m): i for i, (_, m) in enumerate(plan)}
    chosen = set()
    for layer in layers:
        if isinstance(layer, str) and layer in by_name:
            chosen.add(by_name[layer])
            continue
        module = find_layer(model, layer)
        if id(module) not in by_module:
            shown = layer if isinstance(layer, str) else type(layer).__name__
            raise ValueError(f"{shown!r} has no reset_parameters(), so the cascade does not randomize it; "
                             f"randomized layers, top down: {', '.join(n for n, _ in plan[:6])}, …")
        chosen.add(by_module[id(module)])
    if not chosen:
        raise ValueError("layers is empty")
    return sorted(chosen)


def _copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy; a :class:`PixelModel`'s compiled inference forward is dropped, since it is bound
    to the original module (it would run the original weights): copies run eagerly. Its fused copy is
    dropped too (the copy's own is built from its weights, and rebuilt as they are randomized)."""
    work = copy.deepcopy(model, memo)
    for m in work.modules():
        if isinstance(m, PixelModel):
            m._compiled = None
            m._pad_to = None
            m._fused = None
    return work


def _randomize(work: nn.Module, steps: list[int], seed: int, seeding: Seeding) -> Iterator[tuple[str, int]]:
    """Re-initialize ``work``'s layers top-down in place; yield ``(name, index)`` after each step in
    ``steps`` (layers below the last step are left alone)."""
    for i, (name, module) in enumerate(parameterized_layers(work)[: steps[-1] + 1]):
        reinitialize(module, layer_seed(seed, i, seeding))
        if i in steps:
            yield name, i


def cascade(model: nn.Module, seed: int = 0, layers: LayerSelection = None,
            seeding: Seeding = "distinct") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer_name, randomized_model)`` from the logits down: one deep copy of ``model``,
    re-initialized in place one more layer at a time (cascading), yielded after each selected layer.

    The same copy is yielded every time (as quantus does): use it before advancing the generator,
    or copy it. ``model`` itself is never modified. ``layers`` selects the steps yielded (see
    :func:`cascade_steps`: None every layer, an int ``k`` every ``k``-th and the last, or names); the layers
    in between are randomized all the same. Layer ``i`` is seeded by ``layer_seed(seed, i, seeding)``.
    """
    steps = cascade_steps(model, layers)
    work = _copy(model)
    for name, _ in _randomize(work, steps, seed, seeding):
        yield name, work


# -- the control --------------------------------------------------------------------------------
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


class EdgeDetector:
    """The model-independent control of Adebayo et al. (their Fig. 1 "edge detector"): the Sobel
    gradient magnitude ``√(G_x² + G_y²)`` of the grayscale image ``Y = 0.299 R + 0.587 G + 0.114 B``
    (3×3 Sobel kernels, replicated borders), min-max normalized to ``[0, 1]``. It ignores the model,
    so a randomization test must find it unchanged at every step (Spearman = SSIM = 1).

    Takes a model (ignored) so it works as a method factory too; ``model`` stays None.
    """

    name = "edges"

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model: nn.Module | None = None

    def __call__(self, images: Tensor, targets: Targets = None) -> Explanation:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B×3×H×W, got {tuple(images.shape)}")
        gray = torch.einsum("bchw,c->bhw", images, torch.tensor(GRAY, dtype=images.dtype, device=images.device))
        kx = torch.tensor(SOBEL_X, dtype=images.dtype, device=images.device)
        kernels = torch.stack([kx, kx.T])[:, None]
        g = F.conv2d(F.pad(gray[:, None], (1, 1, 1, 1), mode="replicate"), kernels)
        maps = normalize(g.pow(2).sum(1).sqrt())
        b = images.shape[0]
        t = torch.full((b,), -1, dtype=torch.long, device=images.device) if targets is None or callable(targets) \
            else torch.as_tensor(targets, dtype=torch.long, device=images.device).reshape(-1)
        return Explanation(maps=maps, targets=t)


# -- the check ----------------------------------------------------------------------------------
@dataclass
class SanityResult:
    """Similarities of every method's maps on the cascade's models with its maps on the original.

    Attributes:
        methods: ``M`` method names.
        layers: ``S`` step names: :data:`ORIGINAL` (step 0, nothing randomized: a determinism check,
            1 for a deterministic method), then the layer randomized last at each evaluated step.
        randomized: ``S`` numbers of layers randomized at each step (0, then the index + 1).
        spearman, ssim: ``M×S×B`` float tensors (CPU) of :func:`spearman` and :func:`ssim`.
        failed: ``M×S×B`` bools: the method gave no finite map (it raised ``FloatingPointError`` on
            NaN/inf logits or saliency), on that step's model or the original; its values are NaN.
        targets: the ``B`` classes explained at every step (the original model's).
        seed, seeding: the cascade's seed and convention; layer_seeds: ``{layer: seed}`` of every
            layer randomized, top-down (:func:`layer_seed`).
    """

    methods: list[str]
    layers: list[str]
    randomized: list[int]
    spearman: Tensor
    ssim: Tensor
    failed: Tensor
    targets: Tensor
    seed: int
    seeding: str
    layer_seeds: dict[str, int]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (method, step, image): ``method, step, layer, randomized, image, target,
        spearman, ssim, failed`` (``pandas.DataFrame(result.rows())`` is the table)."""
        out = []
        for m, method in enumerate(self.methods):
            for s, layer in enumerate(self.layers):
                for i in range(self.targets.numel()):
                    out.append({"method": method, "step": s, "layer": layer, "randomized": self.randomized[s],
                                "image": i, "target": int(self.targets[i]),
                                "spearman": float(self.spearman[m, s, i]), "ssim": float(self.ssim[m, s, i]),
                                "failed": bool(self.failed[m, s, i])})
        return out


def _is_factory(obj: object) -> bool:
    return inspect.isclass(obj) or not hasattr(obj, "model")


def _pair(name: str, spec: object, model: nn.Module, work: nn.Module,
          memo: dict[int, Any]) -> tuple[Explainer, Explainer]:
    """``(explainer on model, explainer on work)`` for one method spec."""
    if isinstance(spec, str):
        cls = get_method(spec)
        return cls(model), cls(work)
    if _is_factory(spec):
        if not callable(spec):
            raise TypeError(f"method {name!r}: expected a CAM, a method name or a factory, got {type(spec).__name__}")
        return spec(model), spec(work)
    bound = spec.model  # type: ignore[attr-defined]
    if bound is None:  # model-independent
        return spec, spec  # type: ignore[return-value]
    if bound is not model:
        raise ValueError(f"method {name!r} explains another model than the one given; pass the model it was "
                         "built on (for a LoadedModel, its .model), or a factory")
    return spec, copy.deepcopy(spec, memo)  # type: ignore[return-value]


def _maps(explainer: Explainer, images: Tensor, targets: Tensor, batch_size: int) -> Tensor:
    """``B×H×W`` maps in chunks of ``batch_size`` images; NaN for an image the method cannot explain
    (a ``FloatingPointError``: a chunk that raises is retried image by image)."""
    out = []
    for sl in chunks(images.shape[0], batch_size):
        try:
            out.append(explainer(images[sl], targets[sl]).maps)
        except FloatingPointError:
            if sl.stop - sl.start > 1:
                out.append(_maps(explainer, images[sl], targets[sl], 1))
            else:
                out.append(torch.full((1, *images.shape[-2:]), torch.nan, device=images.device))
    maps = torch.cat([m.to(images.device, torch.float32) for m in out])
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"a method returned maps of shape {tuple(maps.shape)} for images {tuple(images.shape)}")
    return maps


def sanity_check(model: nn.Module | LoadedModel, methods: Methods, images: Tensor, targets: Targets = None,
                 seed: int = 0, layers: LayerSelection = None, batch_size: int | None = None,
                 seeding: Seeding = "distinct") -> SanityResult:
    """The cascading model parameter randomization test of ``methods`` on ``images``.

    The original maps are computed once; then, on one deep copy of ``model`` (``model`` itself is
    never modified), step 0 recomputes them unchanged and each later step re-initializes the layers
    down to the next selected one (:func:`cascade`) and runs every method on that same copy before
    moving on. Each map is compared with its original by :func:`spearman` and :func:`ssim`.

    Args:
        model: the classifier (a :class:`PixelModel`, or a :class:`LoadedModel`).
        methods: registered method names, or ``{name: spec}`` where a spec is a CAM object built on
            ``model`` (deep-copied together with the model, so its options and layers carry over), a
            model-independent explainer (``model`` attribute None, e.g. :class:`EdgeDetector()`),
            or a factory called with each model (a CAM class, ``lambda m: LayerCAM(m, "features.3")``).
        images: ``B×3×H×W`` in ``[0, 1]``.
        targets: ``B`` classes, kept for every step; None: the original model's predictions.
        seed, seeding: see :func:`layer_seed`; layers: the steps compared (:func:`cascade_steps`).
        batch_size: images per explaining call (None: all at once). A score-based method's masked
            batch is its own ``batch_size`` option.
    Returns:
        :class:`SanityResult`; a method that raises ``FloatingPointError`` on a model gets NaN and
        ``failed`` there (the other methods and steps go on).
    """
    net = model.model if isinstance(model, LoadedModel) else model
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty B×3×H×W tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    images = images.to(model_device(net))
    b = images.shape[0]
    if targets is None:
        t = predict(net, images)[0]
    else:
        t = torch.as_tensor(targets, dtype=torch.long, device=images.device).reshape(-1)
        if t.numel() != b:
            raise ValueError(f"got {t.numel()} targets for {b} images")
    specs = {m: m for m in methods} if not isinstance(methods, Mapping) else dict(methods)
    if not specs:
        raise ValueError("no methods")
    steps = cascade_steps(net, layers)
    memo: dict[int, Any] = {}
    work = _copy(net, memo)
    pairs = {name: _pair(name, spec, net, work, memo) for name, spec in specs.items()}
    size = batch_size or b
    originals = {name: _maps(orig, images, t, size) for name, (orig, _) in pairs.items()}

    names, randomized, rho, sim, failed = [ORIGINAL], [0], [], [], []

    def compare() -> None:
        r, s, f = [], [], []
        for name, (_, on_work) in pairs.items():
            maps, ref = _maps(on_work, images, t, size), originals[name]
            r.append(spearman(ref, maps))
            s.append(ssim(ref, maps))
            f.append(~(torch.isfinite(maps).flatten(1).all(1) & torch.isfinite(ref).flatten(1).all(1)))
        rho.append(torch.stack(r))
        sim.append(torch.stack(s))
        failed.append(torch.stack(f))

    compare()
    for name, i in _randomize(work, steps, seed, seeding):
        names.append(name)
        randomized.append(i + 1)
        compare()
    plan = parameterized_layers(net)[: steps[-1] + 1]
    return SanityResult(
        methods=list(pairs), layers=names, randomized=randomized,
        spearman=torch.stack(rho, 1).cpu(), ssim=torch.stack(sim, 1).cpu(), failed=torch.stack(failed, 1).cpu(),
        targets=t.cpu(), seed=seed, seeding=seeding,
        layer_seeds={n: layer_seed(seed, i, seeding) for i, (n, _) in enumerate(plan)})
