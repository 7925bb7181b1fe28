"""Metric forwards at reduced precision against IEEE fp32, side by side on the same maps.

EfficientNet-Lite0 (real weights) explains the first ``--images`` sample photos with each method
once (fp32); then Average Drop / Increase and insertion/deletion AUC are scored from those same maps
with ``precision="fp32"`` and with each ``--precisions`` entry (``unioncam.evaluation``: the logits
stay fp32), and the changes and the seconds are printed. On a CPU fp16 is emulated (slow) but rounds
as a GPU does, so the metric changes preview a GPU's; ``--device cuda`` measures the speed too.

    python bench_metrics_precision.py [--images 4] [--steps 16] [--methods gradcam,layercam] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import add_device_arg, device_of, machine, photos

import unioncam
from unioncam.evaluation import average_drop, average_increase, confidence, insertion_deletion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="insertion/deletion steps")
    p.add_argument("--methods", default="gradcam,layercam")
    p.add_argument("--precisions", default="fp16", help="compared with fp32, comma-separated")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    warnings.simplefilter("ignore", RuntimeWarning)  # fp16 on CPU warns that it is slow
    lm = unioncam.load("efficientnet_lite0", channels_last=True)
    model = lm.model.to(device)
    x = photos(args.images, lm.input_size).to(device)
    print(f"metric forwards vs IEEE fp32: efficientnet_lite0, {args.images} photos, {args.steps} steps; "
          f"{machine(device)}")
    for method in args.methods.split(","):
        res = unioncam.explain(lm, x, method, precision="fp32")
        scores = {}
        for precision in ["fp32", *args.precisions.split(",")]:
            start = time.perf_counter()
            y, o = confidence(model, x, res.maps, res.targets, args.batch_size, precision)
            ins, dele = insertion_deletion(model, x, res.maps, res.targets, args.steps, args.batch_size, precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            scores[precision] = (average_drop(y, o), average_increase(y, o), ins, dele, time.perf_counter() - start)
        ad, ai, ins, dele, secs = scores["fp32"]
        for precision, (ad2, ai2, ins2, dele2, secs2) in scores.items():
            if precision == "fp32":
                continue
            print(f"{method} {precision}: AD {ad.mean():.3f} -> {ad2.mean():.3f} ({(ad2 - ad).mean():+.3f}); "
                  f"AI {ai.mean():.1f} -> {ai2.mean():.1f}; insertion {ins.mean():.4f} -> {ins2.mean():.4f} "
                  f"({(ins2 - ins).mean():+.4f}); deletion {dele.mean():.4f} -> {dele2.mean():.4f} "
                  f"({(dele2 - dele).mean():+.4f}); worst image |Δ insertion| {(ins2 - ins).abs().max():.4f}; "
                  f"seconds fp32 {secs:.1f}, {precision} {secs2:.1f} ({secs / secs2:.2f}x)")


if __name__ == "__main__":
    main()
