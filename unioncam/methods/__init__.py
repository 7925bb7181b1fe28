"""Method registry and the one-call API :func:`explain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from unioncam.methods.ablation import AblationCAM
from unioncam.methods.base import CAM, Explanation, Reshape, Targets, find_layer
from unioncam.methods.cam import ClassActivationMap
from unioncam.methods.eigen import EigenCAM, EigenGradCAM
from unioncam.methods.finer import FinerCAM
from unioncam.methods.fullgrad import FullGrad
from unioncam.methods.gradient import GradCAM, GradCAMElementWise, GradCAMPP, HiResCAM, LayerCAM, XGradCAM
from unioncam.methods.group import GroupCAM
from unioncam.methods.integrative import IntegrativeCAM
from unioncam.methods.kpca import KPCACAM
from unioncam.methods.legrad import LeGrad
from unioncam.methods.randomcam import RandomCAM
from unioncam.methods.refine import RefineCAM
from unioncam.methods.score import ScoreCAM
from unioncam.methods.shapley import ShapleyCAM
from unioncam.methods.smoothgrad import SmoothGradCAMpp
from unioncam.methods.smoothscore import ISCAM, SSCAM
from unioncam.methods.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from unioncam.methods.union import UnionCAM
from unioncam.models import LoadedModel
from unioncam.ops import nhwc_to_nchw, vit_reshape
from unioncam.registry import Registry, name_key, parse_names

METHODS: Registry[type[CAM]] = Registry("method")
#: the methods the UnionCAM and Integrative CAM papers compare: the job's default ``--methods``
PAPER_METHODS: tuple[type[CAM], ...] = (GradCAM, GradCAMPP, XGradCAM, LayerCAM, ScoreCAM, UnionCAM, IntegrativeCAM)
#: the other methods pytorch-grad-cam and TorchCAM ship for classifiers (issue 26)
BREADTH_METHODS: tuple[type[CAM], ...] = (HiResCAM, GradCAMElementWise, EigenCAM, EigenGradCAM, RandomCAM,
                                          ClassActivationMap, AblationCAM, FullGrad, SSCAM, ISCAM, SmoothGradCAMpp,
                                          ShapleyCAM, FinerCAM, KPCACAM, RefineCAM, GroupCAM, LeGrad)
for _cls in (*PAPER_METHODS, *BREADTH_METHODS):
    METHODS.add(_cls.name, _cls)


def families() -> dict[str, list[str]]:
    """``{family: [method, ...]}`` from the classes' ``family`` (registry order): the names
    :func:`parse_methods` expands, besides ``all``."""
    out: dict[str, list[str]] = {}
    for name in METHODS.names():
        out.setdefault(METHODS.get(name).family, []).append(name)
    return out


def default_methods() -> list[str]:
    """The job's default ``--methods``: the papers' (:data:`PAPER_METHODS`); ``all`` is every registered one."""
    return [cls.name for cls in PAPER_METHODS]


def row_detail_columns() -> dict[str, str]:
    """Every registered method's detail columns (:meth:`CAM.detail_columns`), name → Arrow type name, in
    registry order, each once: the per-image details the evaluation service's rows carry.

    Raises:
        TypeError: two methods declare one column with different types."""
    out: dict[str, str] = {}
    for name in METHODS.names():
        for column, kind in METHODS.get(name).detail_columns().items():
            if out.setdefault(column, kind) != kind:
                raise TypeError(f"method {name} declares detail {column!r} as {kind}, another as {out[column]}")
    return out


def get_method(name: str) -> type[CAM]:
    """The CAM class registered as ``name``; an unknown name raises with the valid ones."""
    return METHODS.get(name)


def provided_maps(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Of ``methods``, those whose maps another of them computes along the way (its ``provides``):
    ``{method: (provider, detail key)}``."""
    found: dict[str, tuple[str, str]] = {}
    for provider in methods:
        for other, key in get_method(provider).provides.items():
            if other in methods and other != provider and other not in found and provider not in found:
                found[other] = (provider, key)
    return found


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list (or a list) of method names and family names
    (``gradient``, ``score``, ``activation``: :func:`families`), validated and in canonical spelling
    (:func:`unioncam.registry.parse_names`, the parser the metric names use too). A family stands for
    its methods in registry order; duplicates are dropped (first occurrence kept).

    Raises:
        UnknownNameError: a name is not registered (the message suggests the closest).
        ValueError: the list is empty.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    given = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    groups = {name_key(f): members for f, members in families().items()}
    expanded = [m for n in given for m in groups.get(name_key(n), [n])]
    return parse_names(expanded if given else spec, METHODS.names(), "method")


def from_groups(spec: str | Sequence[str]) -> list[str]:
    """Of :func:`parse_methods`'s methods for ``spec``, those it brings in only through ``all`` or a
    family name, not by their own name: the ones a caller may leave out for a model they cannot
    explain (:func:`applicable`), where a method named on its own is refused instead."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    given = [n.strip() for part in parts for n in part.split(",") if n.strip()]
    groups = {name_key(f) for f in families()} | {"all"}
    named = [n for n in given if name_key(n) not in groups]
    own = set(parse_methods(named)) if named else set()
    return [m for m in parse_methods(spec) if m not in own]


class NotApplicableError(ValueError):
    """A method that cannot explain a model (:meth:`CAM.check_model`'s one-line refusal), and its name."""

    def __init__(self, method: str, message: str) -> None:
        super().__init__(message)
        self.method = method


def applicable(methods: Sequence[str], model: nn.Module, target_layer: str | nn.Module | None = None,
               input_size: tuple[int, int] | None = None, *,
               optional: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """``(kept, left_out)``: ``methods`` less those of ``optional`` (:func:`from_groups`) whose
    :meth:`CAM.check_model` refuses ``model``, and ``{method: the one-line reason}`` for those.

    Raises:
        NotApplicableError: a method not in ``optional`` cannot explain ``model`` (its one-line refusal,
            naming the method and the model); other exceptions of a check propagate.
    """
    kept: list[str] = []
    left_out: dict[str, str] = {}
    for method in methods:
        try:
            get_method(method).check_model(model, target_layer, input_size)
        except ValueError as exc:
            if method not in optional:
                raise NotApplicableError(method, str(exc)) from None
            left_out[method] = str(exc)
            continue
        kept.append(method)
    return kept, left_out


def explain(model: nn.Module | LoadedModel, images: Tensor, method: str = "unioncam",
            target_layer: str | nn.Module | None = None, targets: Targets = None,
            *, reshape: Reshape | None = None, **options: Any) -> Explanation:
    """Explain ``images`` (``B×3×H×W`` in ``[0, 1]``) with ``method``.

    Args:
        model: a pixel-space classifier or a :class:`~unioncam.models.LoadedModel`.
        method: a registered method name (see ``METHODS.names()``).
        target_layer: dotted module name or module; None: the model's default.
        targets: classes to explain, or one callable per image on its logits
            (:class:`~unioncam.methods.targets.ClassifierOutputTarget`, ...); None: the predicted class.
        reshape: the target layer's output to ``B×K×h×w`` for transformers
            (:func:`unioncam.ops.vit_reshape`, :func:`unioncam.ops.nhwc_to_nchw`); None:
            ``model.reshape_transform`` if any (see :class:`CAM`).
        **options: method options (``batch_size``, ``precision``, ``theta``, ``stage``, ...).
    """
    net = model.model if isinstance(model, LoadedModel) else model
    with get_method(method)(net, target_layer, reshape=reshape, **options) as cam:
        return cam(images, targets)


__all__ = ["BREADTH_METHODS", "CAM", "METHODS", "PAPER_METHODS", "ClassifierOutputSoftmaxTarget",
           "ClassifierOutputTarget", "Explanation", "NotApplicableError", "applicable", "default_methods", "explain",
           "families", "find_layer", "from_groups", "get_method", "nhwc_to_nchw", "parse_methods", "provided_maps",
           "row_detail_columns", "vit_reshape"]
