"""Every registered method's speed, ours vs the library that defines it, side by side in one run.

    python benchmarks/bench_methods.py [--device cuda] [--images 1] [--size 224] [--methods all]
                                       [--batch-size 32] [--rounds 2] [--skip-reference]
                                       [--no-channels-last] [--no-fuse] [--compile | --no-compile]

For each method: seconds per image of ``unioncam.explain`` and of its reference (pytorch-grad-cam
1.5.7 or TorchCAM 0.5.0; none for UnionCAM and Integrative CAM) on the same model
(efficientnet_lite0 with its real weights, its default layer; each side its own copy), the same real photos and the same
device, the ratio, and the Pearson correlation of the two maps on the first photo (a check that
both computed the same thing). Masked-forward methods (Score-CAM, Ablation-CAM, ...) run
``--batch-size`` masked inputs per forward on both sides (default 32; pytorch-grad-cam's ScoreCAM
through its ``batch_size`` attribute). Each timing is the median of ``--rounds`` calls after one
warm-up call. ``--size`` smaller than the model's 224 makes a quick run (fewer pixels per forward,
fewer positions per map; the channel count is unchanged, and the number of masked forwards only as far
as the constant and all-zero channels, which ours skips, stay the same). ``--images N`` averages over the
first N photos (chelsea, coffee, motorcycle, grace_hopper), whose constant channels differ.

SS-CAM and IS-CAM run ``--samples`` samples per channel on both sides (default 2, not TorchCAM's 35
and 10: their cost is linear in it; the reference forwards every channel per sample, ours the channels
it cannot skip); SS-CAM's and SmoothGrad-CAM++'s maps agree only for
``--images 1`` (TorchCAM draws the noise for the whole batch at once). SmoothGrad-CAM++ runs TorchCAM's
default 4 noisy samples on both sides. Finer-CAM's reference explains the predicted classes itself
(pytorch-grad-cam's ``FinerCAM`` with ``targets=None``); RefineCAM's gets the layers ours finds
(:func:`unioncam.methods.refine.stage_layers`). Group-CAM has no reference library.

Ours runs with the evaluation job's speed options on the device (``unioncam.load(...,
channels_last=True, fuse=True)``: the forward-only passes through a copy with each BatchNorm folded
into its convolution; ``torch.compile`` of the forward-only passes padded to the masked batch, as
the job's workers do, on CUDA only) unless ``--no-channels-last`` / ``--no-fuse`` / ``--compile`` /
``--no-compile`` say otherwise; the reference gets its own copy of the model as its users load it (NCHW, eager). The
header line says which options ours ran with. A compiled model is compiled during the warm-up call,
which is not timed.

Both sides run in IEEE fp32. pytorch-grad-cam gets its model with trainable parameters (it calls
``backward()``, so it also computes the parameters' gradients, as it does for its users); ours stays
frozen (we take ``torch.autograd.grad`` with respect to the hooked activations only).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from common import add_device_arg, device_of, machine, median, photos, table, timed

import unioncam
from unioncam.methods import METHODS, applicable, from_groups, get_method, parse_methods
from unioncam.ops import ieee_fp32

PGC = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
       "scorecam": "ScoreCAM", "hirescam": "HiResCAM", "gradcamelementwise": "GradCAMElementWise",
       "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "random": "RandomCAM", "ablationcam": "AblationCAM",
       "fullgrad": "FullGrad", "shapleycam": "ShapleyCAM", "finercam": "FinerCAM", "kpcacam": "KPCA_CAM",
       "refinecam": "RefineCAM"}
TORCHCAM = {"cam": "CAM", "sscam": "SSCAM", "iscam": "ISCAM", "smoothgradcampp": "SmoothGradCAMpp"}
SAMPLED = ("sscam", "iscam")  # num_samples samples per channel: --samples on both sides


@contextlib.contextmanager
def trainable(model: torch.nn.Module) -> Iterator[None]:
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def reference(method: str, lm: unioncam.LoadedModel, x: torch.Tensor, targets: list[int],
              batch_size: int, samples: int) -> Callable[[], np.ndarray] | None:
    """A call of the reference implementation returning ``B×H×W`` maps, or None without one."""
    layer = lm.model.net.get_submodule(lm.target_layer)
    layers = [layer]
    if method == "refinecam":  # the same layers as ours
        from unioncam.methods.refine import stage_layers

        layers = stage_layers(lm.model, x[:1], layer, 3)
    if method in PGC:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pytorch_grad_cam, PGC[method])

        def run_pgc() -> np.ndarray:
            kwargs = {"batch_size": batch_size} if method == "ablationcam" else {}
            np.random.seed(0)  # RandomCAM's weights: ours are seeded 0 too
            with trainable(lm.model):
                cam = cls(model=lm.model, target_layers=layers, **kwargs)
                try:
                    if method == "scorecam":
                        cam.batch_size = batch_size
                    chosen = None if method == "finercam" else [ClassifierOutputTarget(c) for c in targets]
                    return cam(input_tensor=x.clone(), targets=chosen)
                finally:  # RefineCAM is no context manager: release every base CAM's hooks
                    for base in getattr(cam, "base_cam_per_layer", None) or [getattr(cam, "base_cam", cam)]:
                        base.activations_and_grads.release()

        return run_pgc
    if method in TORCHCAM:
        import torchcam.methods

        extractor_cls = getattr(torchcam.methods, TORCHCAM[method])
        fc = [n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        options = {"batch_size": batch_size, "num_samples": samples} if method in SAMPLED else \
            {} if method == "smoothgradcampp" else {"fc_layer": fc}

        def run_torchcam() -> np.ndarray:
            # SmoothGrad-CAM++ differentiates its noisy forwards: no torch.no_grad() around it
            quiet = contextlib.nullcontext() if method == "smoothgradcampp" else torch.no_grad()
            with extractor_cls(lm.model, target_layer=f"net.{lm.target_layer}", input_shape=tuple(x.shape[1:]),
                               **options) as cam, quiet:
                scores = lm.model(x)
                torch.manual_seed(0)  # SS-CAM's and SmoothGrad-CAM++'s noise: ours is seeded 0 too
                low = cam(class_idx=targets, scores=scores)[0].detach()
            up = torch.nn.functional.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)[:, 0]
            return up.cpu().numpy()

        return run_torchcam
    return None


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="input side (default: the model's, 224)")
    p.add_argument("--methods", default="all", help="methods or families (default all)")
    p.add_argument("--batch-size", type=int, default=32, help="masked inputs per forward, both sides (default 32)")
    p.add_argument("--samples", type=int, default=2,
                   help="SS-CAM's and IS-CAM's num_samples, both sides (default 2; TorchCAM's defaults: 35 and 10)")
    p.add_argument("--rounds", type=int, default=2, help="timed calls per side after one warm-up (median)")
    p.add_argument("--skip-reference", action="store_true", help="time ours only")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="ours without the job's channels_last (default: on, as the job)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="ours without the job's BatchNorm folding (default: on, as the job)")
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="compile our forward-only passes (default: on with CUDA, off on CPU, as the job)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="never compile ours")
    add_device_arg(p)
    args = p.parse_args()
    device = device_of(args.device)
    compile_ = args.compile if args.compile is not None else device.type == "cuda"  # the job's default
    lm = unioncam.load("efficientnet_lite0", input_size=args.size)  # the reference's copy: as users load it
    lm.model.to(device)
    mine = unioncam.load("efficientnet_lite0", input_size=args.size, channels_last=args.channels_last,
                         fuse=args.fuse)
    mine.model.to(device)
    if compile_:
        mine.model.compile_inference(pad_to=args.batch_size)  # as the job's workers: one padded shape
    # "all" and family names leave out the methods that cannot explain the model (LeGrad: ViTs only),
    # as the CLI does; a method named on its own is refused (NotApplicableError)
    methods, left_out = applicable(parse_methods(args.methods), lm.model, None, lm.input_size,
                                   optional=from_groups(args.methods))
    for method, why in left_out.items():
        print(f"(left out {method}: {why})", file=sys.stderr)
    x = photos(args.images, lm.input_size).to(device)
    print(f"# bench_methods: efficientnet_lite0 at {tuple(x.shape[-2:])}, layer {lm.target_layer}, {args.images} "
          f"real photo(s), masked batch {args.batch_size}; ours with channels_last={args.channels_last}, "
          f"fuse={args.fuse}, compile={compile_}; {machine(device)}", flush=True)
    targets = unioncam.engine.predict(lm.model, x)[0].tolist()
    rows = []
    for method in methods:
        options = {"batch_size": args.batch_size} if get_method(method).family == "score" else {}
        options["precision"] = "fp32"
        if method in SAMPLED:
            options["num_samples"] = args.samples

        def ours(method: str = method, options: dict = options) -> torch.Tensor:
            return unioncam.explain(mine, x, method, targets=targets, **options).maps

        ref = None if args.skip_reference else reference(method, lm, x, targets, args.batch_size, args.samples)
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        results: dict[str, object] = {}
        with ieee_fp32():
            for round_ in range(args.rounds + 1):  # round 0: warm-up, not timed
                for side, fn in (("ours", ours), ("ref", ref)):
                    if fn is None:
                        continue
                    seconds, out = timed(fn, device)
                    results[side] = out
                    if round_:
                        times[side].append(seconds / x.shape[0])
        t_ours = median(times["ours"])
        if ref is not None:
            t_ref = median(times["ref"])
            ours_map = results["ours"][0].cpu().numpy()  # type: ignore[index]
            r = pearson(ours_map, np.asarray(results["ref"])[0])
            row = [method, f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ref / t_ours:.2f}×", f"{r:.4f}"]
        else:
            row = [method, f"{t_ours:.3f}", "—", "—", "—"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    print(table(rows, ["method", "ours s/image", "reference s/image", "reference / ours", "Pearson (photo 1)"]))
    unknown = set(PGC) | set(TORCHCAM)
    missing = sorted(unknown - set(METHODS.names()))
    if missing:
        print(f"(reference rows without a registered method: {', '.join(missing)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
