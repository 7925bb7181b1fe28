"""Metric protocols: unioncam.evaluation under each protocol against the library it follows, side by side.

EfficientNet-Lite0 (real weights) explains ``--images`` sample photos with Grad-CAM and UnionCAM
once (2 maps per image, scored together: the service's batching across images and methods); then,
on the same maps and targets:

* Average Drop / Increase (``confidence``: Y and O, 2 forwards per map) under every protocol, against
  grad-cam 1.5.7's ``DropInConfidence`` + ``IncreaseInConfidence`` (pytorch-grad-cam) and torchcam
  0.5.0's ``ClassificationMetric`` (torchcam), each called as their docs show (one call per map
  for torchcam, whose extractor computes one map per update);
* insertion/deletion (``insertion_deletion``) under ``reference``, ``rise`` and ``torchcam``, against
  torchcam's ``DeletionInsertionMetric``; RISE has no package (its code loops one image and step
  at a time on the GPU) and grad-cam has no such curves.

Per line: forwards per map, seconds per map, the ratio to the library where there is one, and the
largest difference of the per-map values.

    python bench_protocols.py [--images 2] [--batch-size 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from common import add_device_arg, device_of, machine, photos, timed
from torch import Tensor

import unioncam
from unioncam.evaluation import average_drop, confidence, insertion_deletion
from unioncam.evaluation.protocols import PROTOCOL_NAMES, curve_counts, get_protocol


class GivenMaps:
    """torchcam's CAM-extractor interface, returning maps computed beforehand."""

    def __init__(self, model: torch.nn.Module, maps: Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(self, *_: Any, **__: Any) -> list[Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[Tensor]) -> Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2, help="sample photos (at most 4)")
    p.add_argument("--batch-size", type=int, default=32, help="forwards per batch (both sides where they take one)")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    lm = unioncam.load("efficientnet_lite0")
    model = lm.model.to(device).eval()
    x = photos(args.images, lm.input_size).to(device)
    grad = unioncam.explain(lm, x, "gradcam")
    union = unioncam.explain(lm, x, "unioncam", targets=grad.targets, batch_size=args.batch_size)
    xs, maps, t = torch.cat([x, x]), torch.cat([grad.maps, union.maps]), torch.cat([grad.targets, grad.targets])
    n, hw = maps.shape[0], x.shape[-2] * x.shape[-1]
    xn = (xs - model.mean) / model.std
    print(f"metric protocols: efficientnet_lite0, {args.images} photos × (gradcam, unioncam) = {n} maps 224×224; "
          f"{machine(device)}")
    confidence(model, xs[:1], maps[:1], t[:1], args.batch_size)  # warm-up

    import torchcam.metrics as tm
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    def softmax(z: Tensor) -> Tensor:
        return z.softmax(-1)

    for name in PROTOCOL_NAMES:
        s, (y, o) = timed(lambda name=name: confidence(model, xs, maps, t, args.batch_size, protocol=name), device)
        line = f"AD/AI {name:<16} 2 forwards/map, {s / n:.4f} s/map"
        if name == "pytorch-grad-cam":
            targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]

            def gradcam_ad(targets: list[Any] = targets) -> np.ndarray:
                IncreaseInConfidence()(xn, maps.cpu().numpy(), targets, model.net)
                return np.asarray(DropInConfidence()(xn, maps.cpu().numpy(), targets, model.net))

            theirs_s, drop = timed(gradcam_ad, device)
            gap = np.abs(average_drop(y, o, name).cpu().numpy() / 100 - drop).max()
            line += (f"; grad-cam 1.5.7 {theirs_s / n:.4f} s/map (4 forwards/map), {theirs_s / s:.1f}x; "
                     f"max |Δ drop| {gap:.1e}")
        elif name == "torchcam":
            def torchcam_ad() -> list[float]:
                out = []
                for i in range(n):
                    metric = tm.ClassificationMetric(GivenMaps(model.net, maps[i:i + 1]), softmax)
                    metric.update(xn[i:i + 1], [int(t[i])])
                    out.append(metric.drop)
                return out

            theirs_s, drop = timed(torchcam_ad, device)
            gap = np.abs(average_drop(y, o, name).cpu().numpy() / 100 - np.array(drop)).max()
            line += f"; torchcam 0.5.0 {theirs_s / n:.4f} s/map, {theirs_s / s:.1f}x; max |Δ drop| {gap:.1e}"
        print(line)

    for name in ("reference", "rise", "torchcam"):
        curves = get_protocol(name).curves
        assert curves is not None
        points = curve_counts(hw, curves.steps, curves.step_rule).numel()
        s, (ins, dele) = timed(lambda name=name: insertion_deletion(model, xs, maps, t, batch_size=args.batch_size,
                                                                   protocol=name), device)
        line = f"insertion/deletion {name:<11} {curves.steps} steps, {2 * points} forwards/map, {s / n:.3f} s/map"
        if name == "torchcam":
            def torchcam_curves() -> list[tuple[float, float]]:
                out = []
                for i in range(n):
                    metric = tm.DeletionInsertionMetric(GivenMaps(model.net, maps[i:i + 1]), softmax,
                                                        batch_size=args.batch_size)
                    metric.update(xn[i:i + 1], [int(t[i])])
                    out.append((metric.insertion, metric.deletion))
                return out

            theirs_s, values = timed(torchcam_curves, device)
            gap = max(np.abs(ins.cpu().numpy() - [v[0] for v in values]).max(),
                      np.abs(dele.cpu().numpy() - [v[1] for v in values]).max())
            line += (f"; torchcam 0.5.0 {theirs_s / n:.3f} s/map ({2 * points - 1} forwards/map), {theirs_s / s:.1f}x; "
                     f"max |Δ AUC| {gap:.1e}")
        print(line)


if __name__ == "__main__":
    main()
