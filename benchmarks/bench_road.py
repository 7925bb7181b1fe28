"""ROAD: unioncam.evaluation.road against pytorch-grad-cam's ROAD, side by side on the same images and maps.

EfficientNet-Lite0 (real weights) explains the first ``--images`` sample photos (224×224) with
GradCAM once; then both implementations score MoRF and LeRF over ``--percentiles`` (default
grad-cam's 10…90) with the default noise (0.01 in normalized units):

* grad-cam 1.5.7: ``ROADMostRelevantFirstAverage`` + ``ROADLeastRelevantFirstAverage`` on the
  normalized tensor and the model's ``net``: per percentile and order one SciPy ``spsolve`` per
  image on the CPU and two forwards (``f_c(I0)`` again, then the imputed batch);
* ``unioncam.evaluation.road.road``: every mask's system solved together by multigrid-preconditioned CG on
  ``--device``, one forward per mask (``Y = f_c(I0)`` is ``unioncam.evaluation.confidence``'s and
  not part of the timing).

It prints seconds per image, forwards per image and the ratio, and how far the ROAD combined
scores agree (both are noisy, so they differ at the noise's level, not bit for bit).

    python bench_road.py [--images 2] [--percentiles 10,20,...,90] [--batch-size 16] [--device cuda]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import add_device_arg, device_of, machine, photos, timed
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import unioncam
from unioncam.evaluation.road import PERCENTILES, road, road_combined


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2, help="sample photos (at most 4)")
    p.add_argument("--percentiles", default=",".join(f"{q:g}" for q in PERCENTILES))
    p.add_argument("--batch-size", type=int, default=None, help="unioncam's forward batch (default: the device's)")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    percentiles = [float(q) for q in args.percentiles.split(",")]
    lm = unioncam.load("efficientnet_lite0")
    model = lm.model.to(device)
    x = photos(args.images, lm.input_size).to(device)
    explanation = unioncam.explain(lm, x, "gradcam")
    maps, targets = explanation.maps, explanation.targets
    n, n_p = x.shape[0], len(percentiles)
    print(f"ROAD: efficientnet_lite0, {n} photos 224×224, GradCAM maps, {n_p} percentiles, MoRF + LeRF, noise 0.01; "
          f"{machine(device)}")

    road(model, x[:1], maps[:1], targets[:1], percentiles[:1], batch_size=args.batch_size)  # warm-up
    ours_s, result = timed(lambda: road(model, x, maps, targets, percentiles, batch_size=args.batch_size), device)

    normalized = (x - model.mean) / model.std
    cams = maps.cpu().numpy()
    their_targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets]

    def gradcam() -> tuple[np.ndarray, np.ndarray]:
        morf = ROADMostRelevantFirstAverage(percentiles)(normalized, cams, their_targets, model.net)
        lerf = ROADLeastRelevantFirstAverage(percentiles)(normalized, cams, their_targets, model.net)
        return morf, lerf

    theirs_s, (morf, lerf) = timed(gradcam, device)
    combined_theirs = (lerf - morf) / 2
    combined_ours = road_combined(result).cpu().numpy()
    print(f"pytorch-grad-cam ROADMostRelevantFirstAverage + ROADLeastRelevantFirstAverage: {theirs_s / n:.2f} s/image, "
          f"{4 * n_p} forwards/image (2 per percentile and order)")
    print(f"unioncam.evaluation.road.road on {device}: {ours_s / n:.2f} s/image, {2 * n_p} forwards/image; "
          f"{theirs_s / ours_s:.1f}x faster")
    gap = np.abs(combined_ours - combined_theirs).max()
    print(f"ROAD combined per image: unioncam {np.array2string(combined_ours, precision=4)}, grad-cam "
          f"{np.array2string(combined_theirs, precision=4)} (max |Δ| {gap:.4f}: independent noise draws)")


if __name__ == "__main__":
    main()
