"""UnionCAM speed, side by side in one run: ours vs a plain per-channel UnionCAM vs pytorch-grad-cam's
ScoreCAM, and each variant of ours against its floor: the same model alone running the passes each
image needs (non-constant channels + 3 masked forwards, at the best batch size, plus one forward
and backward).

    python benchmarks/bench_unioncam.py [--device cuda] [--model efficientnet_lite0] [--images 2]
                                        [--skip compile,gradcam_lib] [--precision fp32]

Everything runs on the same real photos and model (efficientnet_lite0 with its real ImageNet weights;
``--model vgg16`` builds VGG16 with random weights, for its structure). Printed: seconds per image of
each variant, the ratios, the largest difference between our maps and the plain implementation's,
and the floor. pytorch-grad-cam comes with ``pip install -e .[bench]`` (benchmark-only dependency);
without it that row is skipped.

``--device`` (default: cuda when ``torch.cuda.is_available()``, else cpu; the header line names the
device and the GPU) is where every variant runs: the models (ours in each layout, the plain
implementation's, pytorch-grad-cam's, the floor's) and the photos are moved there, and on CUDA every
timer is read after ``torch.cuda.synchronize()``. ``--device cuda`` without CUDA is a one-line error.
Every variant runs in IEEE fp32 (TF32 off, as ours always does), so on a GPU none of them gains
from TF32 rounding; ``--precision`` (tf32, bf16, fp16) runs our masked forwards and the floor's
forwards at that precision instead (the plain implementation and pytorch-grad-cam stay in fp32).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import add_device_arg, device_of, machine, median, photos, random_vgg16_weights, table, timed

import unioncam
from unioncam.methods.base import find_layer
from unioncam.ops import PRECISIONS, Precision, autocast, clear_black_image_cache, ieee_fp32, is_constant


# -- the plain per-channel UnionCAM (independent of unioncam.methods) ---------------------------------
def _prob(model: torch.nn.Module, x: torch.Tensor, c: int) -> float:
    with torch.inference_mode():
        return float(torch.softmax(model(x), dim=1)[0, c])


def _norm(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _up(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def plain_unioncam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                   theta: float = 10.0) -> tuple[torch.Tensor, int]:
    """UnionCAM as public implementations write it: every channel gets its own masked forward at
    batch 1 (constant channels included), ``f(Ib)`` recomputed, NumPy percentile. Returns the
    ``H×W`` map and the number of forwards."""
    size = (x.shape[-2], x.shape[-1])
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
    finally:
        handle.remove()
    c = int(logits.argmax(1))
    (g,) = torch.autograd.grad(logits[0, c], store["a"])
    a, g = store["a"].detach()[0], g[0]
    forwards = 0
    # AMD (eqs. 1-3)
    gn = g.flatten(1).cpu().numpy().astype(np.float64)
    t = torch.from_numpy(np.percentile(gn, theta, axis=1)).to(g.device, g.dtype)[:, None, None]
    w = torch.where(g >= t, g, torch.zeros_like(g))
    total = (w * (w > 0)).sum(dim=(1, 2), keepdim=True)
    alpha = torch.where(w > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(w))
    l_den = _norm(_up((alpha * w.clamp_min(0) * a).sum(0), size))
    # L_Region: Score-CAM, one forward per channel
    base = _prob(model, torch.zeros_like(x), c)
    forwards += 1
    weights = torch.zeros(a.shape[0], device=a.device)
    for k in range(a.shape[0]):
        weights[k] = _prob(model, x * _norm(_up(a[k], size)), c) - base
        forwards += 1
    l_reg = _norm(_up((weights[:, None, None] * a).sum(0).clamp_min(0), size))
    # AMU, AMS (eqs. 4-8)
    b_den, b_reg = _prob(model, x * l_den, c) - base, _prob(model, x * l_reg, c) - base
    l_dereg = _norm(b_den * l_den + b_reg * l_reg)
    b_dereg = _prob(model, x * l_dereg, c) - base
    forwards += 3
    return (l_dereg if b_dereg > b_reg else l_reg), forwards


# -- pytorch-grad-cam's ScoreCAM ----------------------------------------------------------------------
def gradcam_lib_scorecam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(model=model, target_layers=[layer])
    cam.batch_size = 32
    try:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])
    finally:
        cam.activations_and_grads.release()


# -- the floor ----------------------------------------------------------------------------------------
def best_batch(model: torch.nn.Module, like: torch.Tensor, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
               precision: Precision = "fp32") -> int:
    """The batch size whose grad-free forward is fastest per image (best of 2 timings each)."""
    per = {}
    for bs in sizes:
        x = like[torch.arange(bs, device=like.device) % like.shape[0]]
        with torch.inference_mode(), autocast(like.device, precision):
            model(x)
            per[bs] = min(timed(lambda x=x: model(x), like.device)[0] for _ in range(2)) / bs
    return min(per, key=per.__getitem__)


def floor_run(model: torch.nn.Module, x: torch.Tensor, passes: int, batch: int, precision: Precision = "fp32") -> float:
    """Seconds for the model alone to run ``passes`` grad-free forwards per image of ``x``, in
    batches of ``batch`` (inputs: the photos themselves, gathered before the timer starts; masking
    costs nothing in the floor). On CUDA the device is synchronized before and after the loop."""
    n, k = passes * x.shape[0], x.shape[0]
    batches: dict[tuple[int, int], torch.Tensor] = {}  # (first photo, size): at most 2 × k distinct batches
    for lo in range(0, n, batch):
        key = (lo % k, min(lo + batch, n) - lo)
        if key not in batches:
            batches[key] = x[torch.arange(lo, lo + key[1], device=x.device) % k]
    order = [batches[(lo % k, min(lo + batch, n) - lo)] for lo in range(0, n, batch)]
    with torch.inference_mode(), autocast(x.device, precision):
        total, _ = timed(lambda: [model(xb) for xb in order], x.device)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=("efficientnet_lite0", "vgg16"))
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="ours: masked inputs per forward (default: library's)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of ours and the floor")
    p.add_argument("--skip", default="", help="comma-separated: plain, gradcam_lib, compile, nchw")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="ours' masked forwards and the floor's forwards (default fp32: IEEE, as every variant)")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    precision: Precision = args.precision
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)

    weights = random_vgg16_weights() if args.model == "vgg16" else None  # VGG16: structure only

    def model(channels_last: bool = False, compile: bool = False) -> unioncam.LoadedModel:
        lm = unioncam.load(args.model, weights, channels_last=channels_last)
        lm.model.to(device)
        if compile:  # after the move: the compiled graph is built on first use, on the device
            lm.model.compile_inference()
        return lm

    plain_lm, fast_lm = model(), model(channels_last=True)
    x = photos(args.images, plain_lm.input_size).to(device)
    print(f"# bench_unioncam: {args.model} at {tuple(x.shape[-2:])}, {args.images} real photos, {precision}; "
          f"{machine(device)}")

    results: dict[str, list[float]] = {}
    maps: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # the passes each image needs: non-constant channels + 3 masked forwards
        acts: dict[str, torch.Tensor] = {}
        h = find_layer(fast_lm.model, fast_lm.target_layer).register_forward_hook(
            lambda _m, _i, o: acts.__setitem__("a", o))
        fast_lm.model(x)
        h.remove()
    passes = round((~is_constant(acts["a"])).sum(1).float().mean().item()) + 3
    batch = best_batch(fast_lm.model, x, precision=precision)
    print(f"passes per image: {passes} masked forwards + 1 forward/backward; best batch: {batch}", flush=True)

    def ours(name: str, lm: unioncam.LoadedModel) -> None:
        clear_black_image_cache()
        t, res = timed(lambda: unioncam.explain(lm, x, "unioncam", batch_size=args.batch_size, precision=precision),
                       device)
        results.setdefault(name, []).append(t / args.images)
        maps[name] = res.maps
        print(f"{name}: {t / args.images:.2f} s/image", flush=True)

    compiled = None
    if "compile" not in skip:
        compiled = model(channels_last=True, compile=True)
        warm, _ = timed(lambda: unioncam.explain(compiled, x, "unioncam", batch_size=args.batch_size,
                                                 precision=precision), device)
        print(f"torch.compile warm-up run (not counted): {warm / args.images:.1f} s/image", flush=True)
    variants = {"NCHW": plain_lm, "channels_last": fast_lm}
    if "nchw" in skip:
        del variants["NCHW"]
    if compiled is not None:
        variants["channels_last + compile"] = compiled
    t_grad = median([timed(lambda: unioncam.explain(fast_lm, x, "gradcam"), device)[0] for _ in range(3)])  # fwd+bwd
    for r in range(args.rounds):  # interleaved, so the machine's drift hits every variant alike
        print(f"-- round {r + 1}/{args.rounds}", flush=True)
        for name, lm in variants.items():
            ours(f"ours ({name})", lm)
            # The floor of this variant: the same model alone, the same passes, at its best batch size.
            t_floor = (floor_run(lm.model, x, passes, batch, precision) + t_grad) / args.images
            results.setdefault(f"floor ({name})", []).append(t_floor)
            print(f"floor ({name}): {t_floor:.2f} s/image", flush=True)
    fastest = min((k for k in results if k.startswith("ours")), key=lambda k: median(results[k]))

    layer = find_layer(plain_lm.model, plain_lm.target_layer)
    if "plain" not in skip:
        t_plain, diffs, n_fw = 0.0, [], 0
        for i in range(args.images):
            t, (m, n) = timed(lambda i=i: plain_unioncam(plain_lm.model, layer, x[i:i + 1]), device)
            t_plain += t
            n_fw += n
            diffs += [float((m - ours_map[i]).abs().max()) for ours_map in maps.values()]
        results["plain per-channel UnionCAM"] = [t_plain / args.images]
        print(f"plain per-channel UnionCAM: {t_plain / args.images:.2f} s/image ({n_fw // args.images} "
              f"forwards/image); max |map difference| to every variant of ours: {max(diffs):.2e}", flush=True)
    if "gradcam_lib" not in skip and importlib.util.find_spec("pytorch_grad_cam") is None:
        print("pytorch-grad-cam ScoreCAM: skipped (not installed: pip install -e .[bench])", flush=True)
    elif "gradcam_lib" not in skip:
        targets = unioncam.explain(plain_lm, x, "gradcam").targets
        t_lib = sum(timed(lambda i=i: gradcam_lib_scorecam(plain_lm.model, layer, x[i:i + 1], int(targets[i])),
                          device)[0]
                    for i in range(args.images))
        results["pytorch-grad-cam ScoreCAM (bs 32)"] = [t_lib / args.images]
        print(f"pytorch-grad-cam ScoreCAM: {t_lib / args.images:.2f} s/image", flush=True)

    med = {k: median(v) for k, v in results.items()}
    best = med[fastest]
    rows = [[k, f"{v:.2f}", f"{v / best:.2f}×"] for k, v in med.items()]
    print()
    print(table(rows, ["variant (median over rounds)", "s/image", f"time / {fastest}"]))
    for name in variants:
        print(f"ours ({name}) / floor ({name}) = {med[f'ours ({name})'] / med[f'floor ({name})']:.2f} (target ≤ 1.2)")
    for k in ("plain per-channel UnionCAM", "pytorch-grad-cam ScoreCAM (bs 32)"):
        if k in med:
            print(f"{fastest} is {med[k] / best:.2f}× faster than {k}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    with ieee_fp32():
        code = main()
    sys.exit(code)
