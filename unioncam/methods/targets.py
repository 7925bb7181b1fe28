"""Targets as callables on a model's logits, in pytorch-grad-cam's idiom.

A target is what a method explains. An ``int`` is a class index. A callable takes one image's
logits (a ``C`` vector) and returns the scalar to explain; the gradient methods (Grad-CAM,
Grad-CAM++, XGrad-CAM, LayerCAM) differentiate exactly that scalar. The score-based methods
(Score-CAM, UnionCAM, Integrative CAM) are defined on a class's softmax probability ``f_c`` by
their papers, so they take a callable only when it names its class (a ``category`` attribute,
as both classes below have) and use ``f_c`` of that class.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Target = Callable[[Tensor], Tensor]


class ClassifierOutputTarget:
    """The logit of class ``category``: the default score of the gradient methods (an ``int``
    target means the same)."""

    def __init__(self, category: int) -> None:
        self.category = int(category)

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[..., self.category]

    def __repr__(self) -> str:
        return f"ClassifierOutputTarget({self.category})"


class ClassifierOutputSoftmaxTarget:
    """The softmax probability of class ``category`` (the gradient methods then explain ``∂p_c/∂A``
    rather than ``∂S_c/∂A``)."""

    def __init__(self, category: int) -> None:
        self.category = int(category)

    def __call__(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1)[..., self.category]

    def __repr__(self) -> str:
        return f"ClassifierOutputSoftmaxTarget({self.category})"
