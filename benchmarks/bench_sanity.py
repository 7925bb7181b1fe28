"""The cascading model parameter randomization test (unioncam.evaluation.sanity) against quantus 0.6.0's MPRT.

    python benchmarks/bench_sanity.py [--model efficientnet_lite0] [--images 2] [--every 10]
                                      [--methods gradcam,layercam,edges] [--repeats 2] [--device cuda]

For each method, on the first ``--images`` sample photos (real weights for efficientnet_lite0):

* forwards and backwards per image per step: counted by a forward hook on the model (it travels
  with the deep copies), every image of every forward (the explaining one and a score-based method's
  masked ones); one backward per explaining forward for gradient methods. A "step" is one map of one
  image on one model: the original model's, step 0's and each evaluated randomized model's;
* ``sanity_check(..., layers=--every)``: seconds per image per step (Spearman and SSIM included),
  the fastest of ``--repeats`` runs;
* side by side on every layer (quantus' MPRT has no subset): ``sanity_check(seeding="quantus")`` and
  ``quantus.MPRT(layer_order="top_down", seed=42)`` with an ``explain_func`` running the same method
  on the model quantus hands it (Spearman only, quantus' default), ``--repeats`` times each,
  alternating, the fastest of each side reported, with the largest Spearman difference between the
  two (their weights are identical). quantus is imported and run once untimed first.

``--device`` is where the model, the photos and every pass run; timers are read after
``torch.cuda.synchronize()`` on CUDA, after one untimed warm-up explanation per method.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings

import numpy as np
import torch
from common import add_device_arg, device_of, machine, photos, timed
from torch import Tensor, nn

import unioncam
from unioncam.engine import predict
from unioncam.evaluation.sanity import EdgeDetector, parameterized_layers, sanity_check


def factory(name: str):
    return EdgeDetector if name == "edges" else unioncam.get_method(name)


def quantus_mprt(model: nn.Module, x: Tensor, y: Tensor, make, device: torch.device,
                 warm_up: bool = False) -> dict[str, list[float]]:
    """quantus.MPRT(top_down, seed 42) on ``make``'s maps; ``warm_up``: on the logits' layer only
    (``skip_layers``: quantus then explains the last model only; its import happens here too)."""
    import quantus

    def explain_func(model, inputs, targets, **_):
        t = torch.as_tensor(np.asarray(targets), device=device)
        maps = make(model)(torch.from_numpy(inputs).to(device), t).maps
        return maps.double().cpu().numpy()[:, None]

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False,
                              skip_layers=warm_up)
        return metric(model=model, x_batch=x.cpu().numpy(), y_batch=y.cpu().numpy(), explain_func=explain_func,
                      device=str(device), batch_size=len(x))


def bench_method(name: str, model: nn.Module, x: Tensor, y: Tensor, every: int, repeats: int,
                 images_forwarded: list[int], device: torch.device) -> str:
    """One method's line: counts and seconds per image per step, and quantus side by side."""
    make = factory(name)
    n_layers = len(parameterized_layers(model))
    sanity_check(model, {name: make}, x[:1], y[:1], layers=[parameterized_layers(model)[-1][0]])  # warm-up
    images_forwarded[0] = 0
    secs, res = timed(lambda: sanity_check(model, {name: make}, x, y, layers=every), device)
    maps = len(x) * (len(res.layers) + 1)  # + the original model's maps
    fwd = images_forwarded[0] / maps
    for _ in range(repeats - 1):  # the fastest of the repeats
        secs = min(secs, timed(lambda: sanity_check(model, {name: make}, x, y, layers=every), device)[0])
    bwd = 1.0 if getattr(make, "uses_gradients", False) else 0.0
    line = (f"{name}: {fwd:.1f} forwards + {bwd:.1f} backwards per image per step; ours {secs / maps:.3f} "
            f"s/image/step ({len(res.layers) - 1} randomized steps, every {every}-th layer and the last, + step 0 "
            f"+ original: {secs:.1f} s); last step Spearman {res.spearman[0, -1].mean():.3f}, "
            f"SSIM {res.ssim[0, -1].mean():.3f}")
    if repeats < 1:
        return line
    all_maps = len(x) * (n_layers + 2)
    with contextlib.suppress(Exception):  # quantus' import and first call, untimed (a failure shows below)
        quantus_mprt(model, x[:1], y[:1], make, device, warm_up=True)
    ours_s, theirs_s, failure = [], [], ""
    for _ in range(repeats):  # alternating, so a busy machine slows both sides alike; the fastest of each
        secs, ours = timed(lambda: sanity_check(model, {name: make}, x, y, seed=42, seeding="quantus"), device)
        ours_s.append(secs)
        try:
            secs, theirs = timed(lambda: quantus_mprt(model, x, y, make, device), device)
            theirs_s.append(secs)
        except Exception as exc:  # e.g. a constant map: SciPy's batched spearmanr returns one NaN, quantus fails
            failure = f"{type(exc).__name__}: {exc}"
    line += f"; all {n_layers} layers: ours {min(ours_s) / all_maps:.3f} s/image/step"
    if failure:
        return line + f", quantus MPRT failed ({failure})"
    delta = max(float(np.nanmax(np.abs(np.asarray(theirs[layer]) - ours.spearman[0, s].numpy())))
                for s, layer in enumerate(ours.layers))
    return line + (f", quantus MPRT {min(theirs_s) / all_maps:.3f} (quantus/ours {min(theirs_s) / min(ours_s):.2f}x, "
                   f"fastest of {repeats} each), max |Δ Spearman| {delta:.1e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--every", type=int, default=10, help="evaluate every k-th layer of the cascade (and the last)")
    p.add_argument("--methods", default="gradcam,layercam,edges")
    p.add_argument("--repeats", type=int, default=2,
                   help="side-by-side runs with quantus on every layer, alternating (0: skip them)")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    lm = unioncam.load(args.model)
    model = lm.model.to(device)
    x = photos(args.images, lm.input_size).to(device)
    y = predict(model, x)[0]
    n_layers = len(parameterized_layers(model))
    print(f"sanity check (cascading MPRT): {args.model}, {n_layers} parameterized layers, {len(x)} photos; "
          f"{machine(device)}")
    images_forwarded = [0]
    model.register_forward_hook(lambda _m, inputs, _o: images_forwarded.__setitem__(0, images_forwarded[0]
                                                                                   + inputs[0].shape[0]))
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(bench_method(name, model, x, y, args.every, args.repeats, images_forwarded, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main())
