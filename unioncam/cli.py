"""Command line: ``unioncam explain|shards|eval|report|verify`` (``unioncam --help``).

Usage errors (bad paths, unreadable images, unknown models or methods, bad weights) print one
line to stderr and exit with code 2. ``explain`` and ``shards`` need only the library's
dependencies; ``eval``, ``report`` and ``verify`` need the service extra, imported when they run
(``pip install 'unioncam[service]'``), so ``import unioncam.cli`` never imports Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unioncam import __version__, _missing_service_module, storage
from unioncam.engine import DEFAULT_GPU_MEMORY_GIB, gpu_plan, predict
from unioncam.evaluation import average_drop, average_increase, confidence, insertion_deletion
from unioncam.evaluation.protocols import get_protocol
from unioncam.methods import METHODS, NotApplicableError, applicable, explain, from_groups
from unioncam.methods import parse_methods as methods_from_spec
from unioncam.models import WeightsError, load
from unioncam.models import names as model_names
from unioncam.ops import PRECISION_CHOICES, resolve_precision
from unioncam.registry import UnknownNameError
from unioncam.viz import ImageError, load_image, overlay


class UsageError(Exception):
    """A problem with the command line's inputs; reported in one line, exit code 2."""


def parse_methods(spec: str) -> list[str]:
    """:func:`unioncam.methods.parse_methods` with an empty list reported as a usage error."""
    try:
        return methods_from_spec(spec)
    except UnknownNameError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _format_details(details: dict[str, Any], i: int) -> str:
    text = f"  masked_forwards={int(details['forwards'][i])}" if "forwards" in details else ""
    if details.get("selected", [""])[i]:
        b = {k: float(details[k][i]) for k in ("beta_den", "beta_reg", "beta_dereg")}
        text += (f"  AMS={details['selected'][i]}  β_den={b['beta_den']:.4f}"
                 f"  β_reg={b['beta_reg']:.4f}  β_dereg={b['beta_dereg']:.4f}")
    return text


def _method_options(items: list[str], methods: list[str], model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``--method-option`` items, checked as the job checks them: names and options
    (:func:`unioncam.service.config.check_method_options`), then values, by building each method."""
    from unioncam.service.config import (
        ConfigError,
        check_method_option_values,
        check_method_options,
        parse_method_options,
    )

    try:
        found = check_method_options(parse_method_options(items), methods)
        check_method_option_values(found, model)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return found


def cmd_explain(args: argparse.Namespace) -> int:
    methods = parse_methods(args.method)
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"no such image: {', '.join(missing)}")
    stems = [p.stem for p in paths]
    clash = sorted({str(p) for p in paths if stems.count(p.stem) > 1})
    if clash:
        raise UsageError(f"inputs {', '.join(clash)} would write the same <name>_<method>.png; rename or explain "
                         "them in separate runs")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    args.protocol = get_protocol(args.protocol)  # an unknown name: UnknownNameError, listing the valid ones
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    gpu = device.type == "cuda"
    compile_ = args.compile if args.compile is not None else gpu  # GPU default: compiled (docs/performance.md)
    try:
        loaded = load(args.model, args.weights, channels_last=args.channels_last, fuse=args.fuse, compile=compile_,
                      allow_download=args.allow_download)
    except WeightsError:
        raise
    except ValueError as exc:  # an unknown model name or family
        raise UsageError(str(exc)) from None
    if args.target is not None and not 0 <= args.target < len(loaded.class_names):
        raise UsageError(f"--target {args.target} is not a class of {loaded.name} (0..{len(loaded.class_names) - 1})")
    try:  # a method named through `all` or a family that cannot explain this model is left out, with a note
        methods, left_out = applicable(methods, loaded.model, loaded.target_layer, loaded.input_size,
                                       optional=from_groups(args.method))
    except NotApplicableError as exc:
        raise UsageError(str(exc)) from None
    for why in left_out.values():
        print(f"leaving out {why}", file=sys.stderr, flush=True)
    if not methods:
        raise UsageError(f"no method of --method {args.method} can explain {loaded.name}")
    own = _method_options(args.method_option or [], methods, loaded.model)
    model = loaded.model.to(device)
    images = [load_image(p, loaded.input_size) for p in paths]  # all decoded before any work
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; the overlays need a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc}") from None
    options: dict[str, Any] = {"precision": args.precision}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    elif gpu:  # sized from the GPU's free memory, as the job does
        options["batch_size"] = gpu_plan(model, loaded.input_size, resolve_precision(args.precision, device),
                                         DEFAULT_GPU_MEMORY_GIB).batch_size
    for path, image in zip(paths, images, strict=True):
        x = image[None].to(device)
        predicted, logits = predict(model, x)
        if not bool(torch.isfinite(logits).all()):
            source = storage.redact(args.weights) if args.weights else f"{loaded.name}'s default weights"
            raise UsageError(f"{source}: the model's output for {path.name} is not finite (NaN/inf logits): the "
                             "weights are damaged or not this model's")
        probs = logits.softmax(-1)[0]
        target = int(predicted[0]) if args.target is None else args.target
        print(f"{path.name}: {loaded.class_names[target]} (class {target}, p={float(probs[target]):.3f})",
              flush=True)
        for method in methods:
            start = time.perf_counter()
            result = explain(loaded, x, method, targets=[target], **options, **own.get(method, {}))
            seconds = time.perf_counter() - start
            dest = out / f"{path.stem}_{method}.png"
            overlay(image, result.maps[0]).save(dest)
            print(f"  {method:<14} {seconds:7.2f}s  {dest}{_format_details(result.details, 0)}", flush=True)
            if args.metrics:
                print(f"  {'':<14} {_format_metrics(model, x, result.maps, result.targets, args)}", flush=True)
    return 0


def _format_metrics(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                    args: argparse.Namespace) -> str:
    """Y, O, drop, increase and insertion/deletion AUCs of one image's map under ``--protocol``,
    scored in fp32 (as the service does), so ``--precision`` changes the maps only."""
    batch = args.batch_size or None
    y, o = confidence(model, x, maps, targets, batch, protocol=args.protocol)
    text = (f"Y={float(y[0]):.4f}  O={float(o[0]):.4f}  drop={float(average_drop(y, o, args.protocol)[0]):.2f}%"
            f"  increase={float(average_increase(y, o)[0]):.0f}%")
    if args.protocol.curves is not None:
        ins, dele = insertion_deletion(model, x, maps, targets, args.steps, batch, protocol=args.protocol)
        text += f"  insertion={float(ins[0]):.4f}  deletion={float(dele[0]):.4f}"
    return text


def cmd_shards(args: argparse.Namespace) -> int:
    """Convert a dataset (or build the offline sample) into WebDataset shards."""
    from unioncam.data.imagenet import imagenet_samples
    from unioncam.data.sample import write_sample_shards
    from unioncam.data.shards import write_shards
    from unioncam.data.voc import voc_samples

    try:
        if args.dataset == "sample":
            size = 4 if args.shard_size is None else args.shard_size
            for kind, manifest in write_sample_shards(args.out, size).items():
                print(f"{kind}: {manifest['count']} samples in {len(manifest['shards'])} shards"
                      f" → {storage.join(args.out, kind)}")
            return 0
        if args.dataset == "imagenet":
            samples, info = imagenet_samples(args.images, args.labels, args.boxes, args.meta)
            prefix = "imagenet-val"
        else:
            samples, info = voc_samples(args.root, args.split)
            prefix = f"voc2007-{args.split}"
        size = 1000 if args.shard_size is None else args.shard_size
        manifest = write_shards(samples, args.out, prefix, size, info)
    except KeyError as exc:  # str(KeyError) quotes its message
        raise UsageError(str(exc.args[0]) if exc.args else repr(exc)) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"{manifest['count']} samples ({manifest['labelled']} labelled) in {len(manifest['shards'])} shards"
          f" → {args.out}")
    for key in info.get("unlabelled", [])[:10]:
        print(f"  no label: {key}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from unioncam.service.report import OverlayKeyError, write_report

    if args.overlays < 0:
        raise UsageError(f"--overlays must be >= 0, got {args.overlays}")
    keys = None
    if args.overlay_keys is not None:
        keys = [k.strip() for k in args.overlay_keys.split(",") if k.strip()]
        if not keys:
            raise UsageError("--overlay-keys needs comma-separated image keys, e.g. --overlay-keys KEY1,KEY2")
    try:
        if not storage.list_files(storage.join(args.run_dir, "metrics"), ".parquet", limit=1):
            raise UsageError(f"{storage.redact(args.run_dir)} has no metrics/*.parquet: not a run directory "
                             "(or the job wrote nothing yet)")
        for kind, path in write_report(args.run_dir, overlays=args.overlays, overlay_keys=keys).items():
            print(f"{kind}: {storage.redact(path)}")
    except OverlayKeyError as exc:
        raise UsageError(f"--overlay-keys: {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable store, damaged Parquet or manifest
        raise UsageError(f"cannot write the report of {storage.redact(args.run_dir)}: {exc}") from None
    return 0


VERIFY_INCOMPLETE = 3  # `unioncam verify`: nothing damaged, but the run is not finished (or a driver holds it)


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every shard of a run as resume does. Exit 0: every shard of the run's shard set is done
    and intact; 1: something is damaged (a file changed, missing or foreign, a changed source);
    :data:`VERIFY_INCOMPLETE` (3): nothing damaged, but shards are not done or a lock is present."""
    from unioncam.service.rundir import check, load_manifest, lock_state, source_changed

    try:
        manifest = load_manifest(args.run_dir)
    except FileNotFoundError:
        raise UsageError(f"{storage.redact(args.run_dir)} has no manifest.json: not a run directory") from None
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    save_maps = bool(manifest["config"].get("save_maps", True))
    shards = manifest["shards"]
    damaged = unchecked = 0
    not_done: dict[str, str] = {}
    done_names = sorted(n for n, e in shards.items() if e.get("status") == "done")
    checked = check(args.run_dir, manifest, done_names, save_maps, deep=args.deep)  # resume's check
    for name, entry in sorted(shards.items()):
        if entry.get("status") != "done":
            not_done[name] = f"{entry.get('status')}: {entry.get('error', '')}".strip().rstrip(":")
            continue
        why = checked[name]
        unchecked += why is None and not entry.get("files")
        try:
            why = why or source_changed(name, entry, deep=args.deep)
        except storage.StorageError as exc:
            print(f"??   {name}  its source cannot be read now: {exc}")
        damaged += why is not None
        print(f"{'ok' if why is None else 'BAD'}  {name}{'' if why is None else '  ' + why}")
    recorded = manifest.get("shard_set")
    shard_set: dict[str, str] = recorded if isinstance(recorded, dict) else {}
    planned = manifest.get("planned")  # the shards the run takes: its shard set less those beyond --limit
    wanted = set(planned) if isinstance(planned, list) else set(shard_set)
    limit = manifest["config"].get("limit")
    beyond = len(set(shard_set) - wanted - set(shards))
    for name in sorted(wanted - set(shards)):
        not_done[name] = "not started"
    for name, why in list(not_done.items())[:20]:
        print(f"TODO {name}  {why}")
    if len(not_done) > 20:
        print(f"TODO ... and {len(not_done) - 20} more shard(s) not done")
    listed = set(shards)
    for folder in ("metrics", "maps", "sanity"):
        for f in storage.list_files(storage.join(args.run_dir, folder), ".parquet"):
            if storage.basename(f).removesuffix(".parquet") not in listed:
                damaged += 1
                print(f"BAD  {folder}/{storage.basename(f)}  not in the manifest (foreign file)")
    lock = lock_state(args.run_dir)
    if lock:
        print(f"LOCK {lock}")
    done = len(shards) - sum(n in shards for n in not_done)
    total = len(set(shard_set) | set(shards))
    notes = [f"{len(not_done)} not done" if not_done else "", f"{beyond} not evaluated (--limit {limit})" if beyond
             else "", f"{unchecked} without content hashes (written by an earlier unioncam: bytes not checked)"
             if unchecked else "", "a lock is present" if lock else ""]
    print(f"run {manifest['run_id']}: {total} shards in its shard set, {done} done, {damaged} problem(s)"
          + "".join(f", {n}" for n in notes if n) + (" (deep: every byte hashed)" if args.deep else ""))
    if damaged:
        print("rerun the job to redo the shards marked BAD" + ("; a file only --deep finds (its size and modification "
                                                               "time unchanged) must be deleted first" if args.deep
                                                               else ""))
        return 1
    return VERIFY_INCOMPLETE if not_done or lock else 0


EVAL_DATASETS: tuple[str, ...] = ("imagenet", "voc")


def cmd_eval(args: argparse.Namespace) -> int:
    """The Ray evaluation job (as ``jobs/eval.py``): every argument but ``--dataset`` is the job's
    (``args.job_args``, see :func:`main`). Its options are checked before Ray is imported."""
    if args.dataset is None:
        if args.help:
            args.eval_parser.print_help()
            return 0
        raise UsageError("eval needs --dataset imagenet or --dataset voc (the job's options: "
                         "unioncam eval --dataset imagenet --help)")
    if args.dataset not in EVAL_DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(EVAL_DATASETS)}, got {args.dataset!r}")
    from unioncam.service.config import ConfigError, EvalConfig
    from unioncam.service.config import build_parser as job_parser

    job = job_parser(args.dataset)
    job.prog = f"unioncam eval --dataset {args.dataset}"
    if args.help:
        job.print_help()
        return 0
    parsed = job.parse_args(args.job_args)  # argparse's own errors (exit 2), under this command's name
    try:
        cfg = EvalConfig.from_args(parsed, args.dataset)  # parsed once, checked before Ray is imported
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    from unioncam.service.runner import main as run_job  # imports Ray

    return run_job(cfg)


def cmd_rescore(args: argparse.Namespace) -> int:
    """``unioncam rescore RUN_DIR --protocol P``: the job with ``--rescore RUN_DIR`` (its saved maps
    scored again under another protocol into ``RUN_DIR/rescore/P``; the run's own files are only read)."""
    from unioncam.service.config import ConfigError, EvalConfig
    from unioncam.service.config import build_parser as job_parser

    argv = ["--rescore", args.run_dir, *args.job_args, "--protocol", args.protocol]
    job = job_parser(None)
    job.prog = "unioncam rescore"
    parsed = job.parse_args(argv)  # argparse's own errors (exit 2), under this command's name
    try:
        cfg = EvalConfig.from_args(parsed, None)  # checked before Ray; the dataset is the run's (from its manifest)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    from unioncam.service.runner import main as run_job  # imports Ray

    return run_job(cfg)


DESCRIPTION = ("Class activation maps (UnionCAM, Integrative CAM and their baselines) at dataset scale: "
               "explain images, convert datasets into WebDataset shards, evaluate them with Ray, "
               "and report and verify the runs.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unioncam", description=DESCRIPTION,
                                     epilog="Each command's options: unioncam COMMAND --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print unioncam's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    p = sub.add_parser("explain", help="write a heat-map overlay PNG per image and method")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain (JPEG, PNG, ...)")
    p.add_argument("--model", default="efficientnet_lite0", help=f"one of: {', '.join(model_names())}")
    p.add_argument("--allow-download", action="store_true",
                   help="let torchvision/timm download missing weights into their own caches (default: never)")
    p.add_argument("--weights", default=None, help="state-dict file (weights_only); default: see docs/models.md")
    p.add_argument("--method", default="unioncam", help=f"'all' or comma-separated: {', '.join(METHODS.names())}")
    p.add_argument("--method-option", action="append", metavar="METHOD.OPTION=VALUE",
                   help="a method's own option, repeatable: sscam.num_samples=10, legrad.blocks=3 (docs/library.md)")
    p.add_argument("--out", required=True, help="output folder for the overlay PNGs")
    p.add_argument("--target", type=int, default=None, help="class index to explain (default: predicted)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="masked inputs per forward (default, as the job: 4 on CPU, sized from the GPU's free memory)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="the methods' masked forwards (auto: fp16 on CUDA, fp32 on CPU); metrics always fp32")
    # the speed options' defaults are the evaluation job's (EvalConfig): channels_last and fuse on, compile on with CUDA
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const=True, default=True,
                   help="NHWC conv weights, faster on CPU and cuDNN (the default, as in the job)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   help="keep conv weights NCHW")
    p.add_argument("--fuse", dest="fuse", action="store_const", const=True, default=True,
                   help="forward-only passes through a copy with BatchNorm folded into the convolutions "
                        "(the default, as in the job)")
    p.add_argument("--no-fuse", dest="fuse", action="store_const", const=False,
                   help="forward-only passes through the model as it is")
    p.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the forward-only passes (default: on with CUDA, off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="never compile")
    p.add_argument("--metrics", action="store_true",
                   help="also print Y, O, drop, increase and insertion/deletion AUC per image and method")
    p.add_argument("--steps", type=int, default=None,
                   help="insertion/deletion steps (with --metrics; default: the protocol's, 224 for reference)")
    p.add_argument("--protocol", default="reference",
                   help="metric conventions (with --metrics): reference, rise, pytorch-grad-cam, torchcam")
    p.set_defaults(func=cmd_explain)

    sh = sub.add_parser("shards", help="convert a dataset into WebDataset shards")
    kinds = sh.add_subparsers(dest="dataset", required=True, metavar="DATASET", help="one of:")
    im = kinds.add_parser("imagenet", help="ILSVRC2012 val (flat folder + labels, or wnid folders)")
    im.add_argument("--images", required=True, help="folder of ILSVRC2012_val_*.JPEG, or of 1000 wnid folders")
    im.add_argument("--labels", default=None,
                    help="LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt")
    im.add_argument("--meta", default=None, help="devkit meta.mat (default: beside the ground-truth txt)")
    im.add_argument("--boxes", default=None, help="folder of val XMLs, or LOC_val_solution.csv")
    voc = kinds.add_parser("voc", help="PASCAL VOC2007")
    voc.add_argument("--root", required=True, help="VOCdevkit/VOC2007")
    voc.add_argument("--split", default="test", help="the ImageSets/Main split to convert (default: test)")
    smp = kinds.add_parser("sample", help="the offline real-photo sample (ImageNet- and VOC-style)")
    for k in (im, voc, smp):
        k.add_argument("--out", required=True, help="output folder or URI prefix (s3://bucket/shards)")
        k.add_argument("--shard-size", type=int, default=None, help="samples per shard (1000; sample: 4)")
        k.set_defaults(func=cmd_shards)

    rp = sub.add_parser("report", help="aggregate a run directory's Parquet rows into report/ (csv, md, html, plots)")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the job's --out (a folder or a URI such as s3://bucket/run)")
    rp.add_argument("--overlays", type=int, default=4, help="images in the overlay grid")
    rp.add_argument("--overlay-keys", default=None, metavar="KEY1,KEY2",
                    help="comma-separated image keys to draw in the overlay grid, in this order "
                         "(default: the first --overlays images that every method explained)")
    rp.set_defaults(func=cmd_report)

    vf = sub.add_parser("verify", help="check that every shard of RUN_DIR is complete and this run's (as resume does)",
                        epilog="Exit codes: 0 every shard of the run's shard set done and intact; 1 damaged (a file "
                               "changed, missing or foreign, a source changed); 3 nothing damaged but the run is "
                               "unfinished (shards not done, or a lock present); 2 not a run directory.")
    vf.add_argument("run_dir", metavar="RUN_DIR", help="the job's --out (a folder or a URI such as s3://bucket/run)")
    vf.add_argument("--deep", action="store_true",
                    help="hash every output file and every shard source (default: hash only files whose size or "
                         "modification time moved since they were written)")
    vf.set_defaults(func=cmd_verify)

    rs = sub.add_parser("rescore", help="score a run's saved maps again under another metric protocol "
                                        "(a separate table: RUN_DIR/rescore/PROTOCOL; the run is only read)",
                        epilog="Other job options (--out, --metrics, --insdel-steps, --weights, --workers, --address, "
                               "--batch-size, ...) are passed on: see unioncam eval --dataset imagenet --help.")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory with maps (local or a URI)")
    rs.add_argument("--protocol", required=True,
                    help="reference, rise, pytorch-grad-cam or torchcam (unioncam.evaluation.protocols)")
    rs.set_defaults(func=cmd_rescore)

    # every argument but --dataset (and -h) is passed on to the job: main() collects them (parse_known_args)
    ev = sub.add_parser("eval", help="run the Ray evaluation job on WebDataset shards (as jobs/eval.py)",
                        add_help=False, allow_abbrev=False,
                        usage="%(prog)s --dataset {imagenet,voc} [job options ...]",
                        description="Evaluate saliency methods on WebDataset shards with Ray (needs the service "
                                    "extra: pip install 'unioncam[service]'). Every option but --dataset is the "
                                    "job's, the same as jobs/eval.py's.",
                        epilog="The job's options: unioncam eval --dataset imagenet --help")
    ev.add_argument("--dataset", metavar="{imagenet,voc}", default=None,
                    help="which dataset the shards hold: its label names and box semantics (required)")
    ev.add_argument("-h", "--help", action="store_true",
                    help="show this help, or with --dataset the job's options, and exit")
    ev.set_defaults(func=cmd_eval, eval_parser=ev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, job_args = parser.parse_known_args(argv)  # arguments unknown to `unioncam eval` are the job's
    if job_args and args.func not in (cmd_eval, cmd_rescore):
        parser.error(f"unrecognized arguments: {' '.join(job_args)}")  # as parse_args
    args.job_args = job_args
    try:
        return int(args.func(args))
    except (UsageError, UnknownNameError, WeightsError, ImageError) as exc:
        print(f"unioncam: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a command of the service extra on a library-only install
        missing = _missing_service_module(exc)
        if missing is None:
            raise
        print(f"unioncam: error: unioncam {args.command} needs {missing}, from the service extra: "
              "pip install 'unioncam[service]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
