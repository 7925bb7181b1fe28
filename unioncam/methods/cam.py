"""The original CAM (Zhou et al., 2016), as TorchCAM 0.5.0's ``CAM`` computes it.

For a classifier whose logits are ``S = W · GAP(A) + b`` (global average pooling of the target
layer, then one linear layer), ``CAM_c = Σ_k W_ck A_k``; TorchCAM applies no ReLU to it (its ``CAM``
leaves ``_relu`` off), and neither do we: the map is ``norm(up(Σ_k W_ck A_k))``.

Decisions:

* The head is the model's last ``nn.Linear`` (TorchCAM: the only one), or ``fc_layer=``. Whether the
  logits really are ``W · GAP(A) + b`` is checked on the explaining forward's own activations and
  logits (and by :meth:`ClassActivationMap.check_model` on a random image), so a model with another
  head is refused with one line instead of getting a meaningless map.
* A head reading the *flattened* activations (``S = W · vec(A) + b``, e.g. a small CNN without
  pooling) is accepted too, with weights per position: ``CAM_c(i, j) = Σ_k W_c,kij A_kij``, the
  class score's share of each position exactly as CAM's is under pooling (where ``W_c,kij`` is
  the same at every position, up to the ``1/hw`` that normalization removes). TorchCAM refuses
  such a head (its weight is not ``C×K``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unioncam.methods.base import CAM, Details, eval_mode, find_layer, model_name


def linear_head(model: nn.Module, fc_layer: str | nn.Module | None = None) -> nn.Linear:
    """The classifier's final linear layer: ``fc_layer`` when given, else the last ``nn.Linear``."""
    if fc_layer is not None:
        layer = find_layer(model, fc_layer)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"cam: fc_layer must be an nn.Linear, got {type(layer).__name__} "
                             f"in model {model_name(model)}")
        return layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cam: model {model_name(model)} has no linear classifier layer; CAM needs global "
                         "average pooling and a final linear layer")
    return linears[-1]


def head_weights(head: nn.Linear, acts: Tensor, logits: Tensor, model: nn.Module, targets: Tensor) -> Tensor:
    """The per-position weights ``B×K×h×w`` of each image's target class ``c`` such that
    ``logits_c = Σ_kij W_c,kij A_kij + b_c`` (pooling head: ``W_ck / hw`` everywhere, ``B×K×1×1``
    broadcast; flattening head: the weights as they are). Raises ``ValueError`` when neither reproduces
    the logits."""
    k, h, w = acts.shape[1:]
    weight = head.weight.detach().to(acts.dtype)
    bias = head.bias.detach().to(acts.dtype) if head.bias is not None else torch.zeros(weight.shape[0],
                                                                                        dtype=acts.dtype,
                                                                                        device=acts.device)
    if weight.shape[1] == k:  # pooling: one matrix product on the pooled activations
        per_position = (weight[targets] / (h * w))[:, :, None, None]
        features = acts.mean(dim=(2, 3))
    elif weight.shape[1] == k * h * w:
        per_position = weight[targets].view(-1, k, h, w)
        features = acts.flatten(1)
    else:
        per_position = None
    if per_position is not None and logits.shape[-1] == weight.shape[0]:
        predicted = features @ weight.T + bias
        scale = float(logits.abs().amax()) + 1e-12
        if torch.allclose(predicted, logits.to(acts.dtype), rtol=1e-3, atol=1e-4 * scale):
            return per_position
    raise ValueError(f"cam: model {model_name(model)} has no global-average-pooling + linear head after its "
                     f"target layer ({k}×{h}×{w} activations, last linear layer {weight.shape[1]}→{weight.shape[0]}); "
                     "use gradcam, whose map equals CAM's for such heads")


class ClassActivationMap(CAM):
    """CAM: ``Σ_k W_ck A_k`` with ``W`` the final linear layer's weights (no ReLU, as TorchCAM).

    Option ``fc_layer``: the head (dotted name or module); default the model's last ``nn.Linear``.
    """

    name = "cam"
    family = "activation"
    uses_gradients = False

    def __init__(self, *args: object, fc_layer: str | nn.Module | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.head = linear_head(self.model, fc_layer)

    @classmethod
    def check_model(cls, model: nn.Module, target_layer: str | nn.Module | None = None,
                    input_size: tuple[int, int] | None = None) -> None:
        head = linear_head(model)
        layer = find_layer(model, target_layer)
        seen: list[Tensor] = []
        size = input_size or (224, 224)
        x = torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(0))
        param = next(iter(model.parameters()), None)
        x = x.to(device=param.device if param is not None else "cpu")
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
        try:
            with torch.no_grad(), eval_mode(model):
                logits = model(x)
        finally:
            handle.remove()
        reshape = getattr(model, "reshape_transform", None)
        acts = reshape(seen[0]) if reshape is not None else seen[0]
        if acts.dim() != 4:
            raise ValueError(f"cam: the target layer of model {model_name(model)} is not a B×K×h×w map")
        head_weights(head, acts.to(logits.dtype), logits, model, logits.argmax(dim=1))

    def compute(self, images: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None,
                logits: Tensor) -> tuple[Tensor, Details]:
        return (head_weights(self.head, acts, logits, self.model, targets) * acts).sum(dim=1), {}
