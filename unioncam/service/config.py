"""The evaluation job's configuration: one typed object, from CLI flags and/or a YAML file.

``EvalConfig.from_argv(argv, dataset)`` reads ``--config FILE`` (YAML whose keys are the field
names, ``-`` or ``_``) and lets flags given on the command line override it. With no ``--shards``
the job evaluates the bundled sample (built under ``datasets/sample/`` when missing) with
``efficientnet_lite0`` and coarse insertion/deletion (32 steps), so it runs in minutes on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unioncam import storage
from unioncam.engine import DEFAULT_GPU_MEMORY_GIB
from unioncam.evaluation import METRICS, default_metrics, get_metric, parse_metrics
from unioncam.evaluation.protocols import PROTOCOL_NAMES, get_protocol
from unioncam.methods import METHODS, default_methods, from_groups, get_method, parse_methods
from unioncam.models import canonical as canonical_model
from unioncam.models import names as model_names
from unioncam.ops import PRECISION_CHOICES, check_precision

Dataset = Literal["imagenet", "voc"]
SAMPLE_DIR = Path("datasets/sample")


class ConfigError(ValueError):
    """An invalid option or option combination; the message says which and why."""


@dataclass
class EvalConfig:
    """Everything one evaluation run needs.

    Attributes:
        dataset: "imagenet" or "voc" (which label names and box semantics apply).
        shards: shard list, glob or brace pattern, local or a URI (``s3://bucket/val-*.tar``);
            None: the bundled sample.
        out: the run directory, local or a URI (``metrics/``, ``maps/``, ``report/``, ``manifest.json``).
        model / weights: a model name (``vgg16``, ``torchvision:resnet50``, ``timm:convnext_tiny``; see
            :func:`unioncam.models.load`) and an optional weights file (path or URI).
        allow_download: let torchvision/timm download missing weights into their caches (never by
            default: everything else is offline).
        methods: method names; metrics: any of ``ad, ai, insdel, epg, road`` (ad and ai share Y
            and O; road: ROAD's MoRF/LeRF at percentiles 10…90, :mod:`unioncam.evaluation.road`, not in the
            default list: 18 imputed images per map).
        workers / gpus_per_worker / cpus_per_worker: None picks from the cluster's resources.
        batch_size: masked inputs per forward (None: 4 on CPU, 32 on GPU).
        images_per_batch: images explained together, their masked inputs sharing batches (None: 1 on
            CPU, where one image fills a batch and progress is per image; 8 on GPU).
        precision: precision of the methods' masked forwards: "auto" (fp16 on GPU workers, fp32 on
            CPU; :func:`unioncam.ops.resolve_precision`), "fp32", "tf32", "bf16", "fp16". Metrics
            run in ``metrics_precision``.
        metrics_precision: precision of the metric forwards (Y, O, insertion/deletion): "fp32"
            (default, IEEE: today's numbers), or "fp16"/"tf32"/... for speed on GPUs; logits stay fp32.
        channels_last / fuse / compile: the model's speed options (:func:`unioncam.models.load`);
            channels_last is on by default (benchmarks/bench_unioncam.py: 1.2-1.4× on CPU); fuse (on by
            default) runs the forward-only passes through a copy with each BatchNorm folded into its
            convolution (:mod:`unioncam.models.fused`; 1.2-1.5× on EfficientNet-Lite0's CPU forward,
            nothing to fold in VGG16); compile
            None means on for GPU workers (compiled once, warmed up before the first shard, batches
            padded to one shape) and off on CPU (where it lost on VGG16 and costs ~80 s per worker).
        max_gpu_memory: GiB per GPU worker from which batch sizes are derived (with 90% of the free
            memory as a second cap; :func:`unioncam.engine.gpu_plan`); explicit batch sizes win.
        limit: evaluate at most this many images (in shard order); None: all.
        insdel_steps: insertion/deletion steps (None: the protocol's: 224 at 224² for ``reference``
            and ``rise``, as REFERENCE.md; 20 for ``torchcam``; the bundled sample: 32 with ``reference``).
        protocol: the metric conventions (:mod:`unioncam.evaluation.protocols`): "reference" (REFERENCE.md,
            the default), "rise", "pytorch-grad-cam" (no insertion/deletion: ``insdel`` is dropped
            from the metrics) or "torchcam"; recorded in the manifest, the provenance and the report.
        rescore: a finished run directory whose saved maps are scored again under ``protocol``
            (set by ``unioncam rescore``): no map is recomputed, the shards are that run's done
            shards, the targets its rows', and its files are only read.
        sanity: also run the model parameter randomization sanity check (:mod:`unioncam.evaluation.sanity`)
            on every image: ``sanity/<shard>.parquet``, Spearman and SSIM per method and cascade step.
        sanity_layers: with ``sanity``, compare after every K-th parameterized layer from the logits
            down (and the last); None: after every layer (VGG16: 16, EfficientNet-Lite0: 99 steps).
        sanity_seed: seeds the re-initialization (recorded in the manifest and provenance); default 0.
        seed: the seed of the seeded methods (``random``, ``sscam``, ``smoothgradcampp``: ``CAM.seeded``),
            default 0; recorded in the manifest and in their rows' ``seed`` column. The same seed gives
            the same maps whatever the batch size. Given without a seeded method: refused.
            ``sanity_layers`` and ``sanity_seed`` without ``sanity`` are refused (they would do nothing).
        method_options: ``{method: {option: value}}``, the methods' own options (``CAM.option_names``: SS-CAM's
            ``num_samples``, LeGrad's ``blocks``, ...; the flag ``--method-option sscam.num_samples=10``), for
            methods the run runs; values are JSON values (numbers, booleans, strings, lists). ``batch_size``,
            ``precision`` and ``seed`` have flags of their own. Recorded in the manifest's settings (only when
            given) and in the files' provenance.
        target: "predicted" (REFERENCE.md default), "label" (the dataset's label; refused for VOC
            shards, whose 20 labels are not the model's ImageNet classes), or "topk:K" (K rows per
            image, one per predicted class, with ``rank`` 1..K).
        save_maps: write ``maps/<shard>.parquet``.
        address: Ray address; None: ``RAY_ADDRESS`` or a new local cluster on 127.0.0.1.
        max_restarts / max_task_retries: Ray actor fault tolerance (a dead worker is restarted
            and its shard redone).
        start_timeout: seconds a worker may take to start (waiting for resources, e.g. for an
            autoscaler to add a GPU node, then loading the model); shards go only to started
            workers, one that has not started by then is given up, and none started is an error.
        overlays: images shown in the report's overlay grid.
    """

    dataset: Dataset = "imagenet"
    shards: str | None = None
    out: str | None = None
    model: str | None = None
    weights: str | None = None
    allow_download: bool = False
    methods: list[str] = field(default_factory=default_methods)
    metrics: list[str] = field(default_factory=default_metrics)
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    batch_size: int | None = None
    images_per_batch: int | None = None
    precision: str = "auto"
    metrics_precision: str = "fp32"
    channels_last: bool = True
    fuse: bool = True
    compile: bool | None = None
    max_gpu_memory: float = DEFAULT_GPU_MEMORY_GIB
    limit: int | None = None
    insdel_steps: int | None = None
    protocol: str = "reference"
    rescore: str | None = None
    sanity: bool = False
    sanity_layers: int | None = None
    sanity_seed: int | None = None  # 0 with sanity (resolved()); given without sanity: refused
    seed: int | None = None  # of the seeded methods: 0 when one runs (resolved()); given without one: refused
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {method: {option: value}}
    target: str = "predicted"
    save_maps: bool = True
    address: str | None = None
    max_restarts: int = 3
    max_task_retries: int = 3
    start_timeout: float = 600.0
    progress_interval: float = 10.0
    overlays: int = 4
    report: bool = True
    sample: bool = False  # set by resolved() when no shards were given
    #: set by resolved(): the methods that ``methods`` names only through ``all`` or a family; the driver
    #: leaves out those the model cannot use (:func:`unioncam.methods.applicable`) instead of refusing
    methods_optional: list[str] = field(default_factory=list, metadata={"derived": True})

    @property
    def is_sample(self) -> bool:
        return self.sample or (self.shards is None and self.rescore is None)

    def resolved(self) -> EvalConfig:
        """A validated copy with the sample defaults filled in. Raises :class:`ConfigError`."""
        c = dataclasses.replace(self, methods=list(self.methods), metrics=list(self.metrics))
        if c.dataset not in ("imagenet", "voc"):
            raise ConfigError(f"unknown dataset {c.dataset!r}; valid: imagenet, voc")
        if self.sample and self.shards is not None:
            raise ConfigError("'sample: true' and 'shards' exclude each other: give one")
        try:
            protocol = get_protocol(c.protocol)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        c.protocol = protocol.name
        if c.rescore is not None:
            if c.sanity:
                raise ConfigError("--sanity recomputes maps on randomized models: run it as an evaluation, "
                                  "not a rescore")
            c = _rescoring(c, protocol.name)
        _resolve_sanity(c)
        if c.is_sample:
            c.sample = True
            c.shards = str(SAMPLE_DIR / c.dataset / f"sample-{c.dataset}-*.tar")
            c.out = c.out or f"runs/sample-{c.dataset}"
            c.model = c.model or "efficientnet_lite0"
            if c.insdel_steps is None and protocol.name == "reference":
                c.insdel_steps = 32
        elif not c.out:
            raise ConfigError("--out RUN_DIR is required with --shards")
        try:
            c.model = canonical_model(c.model or "vgg16")
        except ValueError as exc:  # unknown name, family or architecture; the message lists the choices
            raise ConfigError(str(exc)) from None
        if c.insdel_steps is None:
            c.insdel_steps = protocol.curves.steps if protocol.curves else 224
        try:
            c.methods_optional = from_groups(c.methods)
            c.methods = parse_methods(c.methods)
            c.metrics = parse_metrics(c.metrics)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        _resolve_seed(c)
        _resolve_method_options(c)
        unavailable = {m: why for m in c.metrics if (why := get_metric(m).unavailable(protocol))}
        if unavailable:  # e.g. insdel under pytorch-grad-cam: the library has no curves, nothing to compare with
            c.metrics = [m for m in c.metrics if m not in unavailable]
            if not c.metrics:
                raise ConfigError(f"{'; '.join(unavailable.values())}; choose other --metrics or another --protocol")
        try:
            check_precision(c.precision)
            check_precision(c.metrics_precision)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if c.target not in ("predicted", "label") and top_k(c.target) is None:
            raise ConfigError(f"target must be 'predicted', 'label' or 'topk:K' with K >= 1, got {c.target!r}")
        if c.dataset == "voc" and c.target == "label":
            raise ConfigError(f"--target label with VOC shards: {c.model} is not a model of VOC's 20 classes (no "
                              "model the job can load is), so VOC label 7 'cat' would be explained as its class 7 "
                              "(ImageNet's 'cock'); use --target predicted or topk:K")
        _check_numbers(c)
        if c.weights is not None:
            try:
                found = storage.is_file(c.weights)
            except OSError as exc:
                raise ConfigError(f"cannot check the weights file: {exc}") from None
            if not found:
                raise ConfigError(f"weights file not found: {storage.redact(c.weights)}")
        return c

    def identity(self) -> dict[str, Any]:
        """The options that decide the rows' values; a rerun into the same ``out`` must match (the
        sanity options only with ``sanity``, the seed only with a seeded method)."""
        keys = ("dataset", "model", "methods", "metrics", "precision", "metrics_precision", "limit", "insdel_steps",
                "protocol", "rescore", "sanity", "target", "save_maps") + (
                    ("sanity_layers", "sanity_seed") if self.sanity else ()) + (
                    ("seed",) if self.seed is not None else ()) + (
                    ("method_options",) if self.method_options else ())
        return {k: getattr(self, k) for k in keys}

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], dataset: Dataset | None = None) -> EvalConfig:
        """Build from a mapping (YAML): unknown or doubled keys (``batch-size`` and ``batch_size``)
        and values of the wrong type raise, naming the key. ``dataset`` is the default when the
        mapping has none (the entry point's dataset)."""
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
        clean: dict[str, Any] = {}
        for k, v in values.items():
            key = str(k).replace("-", "_")
            if key in clean:
                raise ConfigError(f"config key {key!r} is given twice (as '-' and '_' spellings)")
            clean[key] = v
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        for key in ("methods", "metrics"):
            if isinstance(clean.get(key), str):
                clean[key] = _names(key, clean[key])
        for key, value in clean.items():
            _check_type(key, value)
        if dataset is not None:
            clean.setdefault("dataset", dataset)
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], dataset: Dataset | None = None) -> EvalConfig:
        """A YAML file of options: at most :data:`MAX_CONFIG_BYTES`, no anchors or aliases (a few
        nested aliases expand to gigabytes)."""
        import yaml

        try:
            with open(path, "rb") as handle:  # never more than the cap (a path such as /dev/zero never ends)
                text = handle.read(MAX_CONFIG_BYTES + 1)
            if len(text) > MAX_CONFIG_BYTES:
                raise ConfigError(f"config {path} is over {MAX_CONFIG_BYTES} bytes, the most that is read")
            if any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)
                   for e in yaml.parse(text, Loader=yaml.SafeLoader)):
                raise ConfigError(f"config {path} uses YAML anchors or aliases (&x / *x); write values out")
            values = yaml.load(text, Loader=_unique_key_loader(str(path))) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {' '.join(str(exc).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping of option: value")
        return cls.from_dict(values, dataset)

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None, dataset: Dataset | None) -> EvalConfig:
        """Parse the job's command line (see :func:`build_parser`) into a resolved config: :meth:`from_args`."""
        return cls.from_args(build_parser(dataset).parse_args(argv), dataset)

    @classmethod
    def from_args(cls, args: argparse.Namespace, dataset: Dataset | None) -> EvalConfig:
        """The resolved config of the job's parsed flags (:func:`build_parser`): flags override
        ``--config``. ``dataset``: the entry point's (None for a rescore: the rescored run's)."""
        base = cls.from_yaml(args.config, dataset) if args.config else cls(dataset=dataset) if dataset else cls()
        if dataset is not None and base.dataset != dataset:
            raise ConfigError(f"config {args.config} says dataset: {base.dataset}, but this entry point evaluates "
                              f"{dataset} (use jobs/eval_{base.dataset}.py or jobs/eval.py --dataset {base.dataset})")
        given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
        for key in ("methods", "metrics"):
            if key in given:
                given[key] = _names(key, given[key])
        if "method_options" in given:  # flags over the YAML's, option by option
            flags = parse_method_options(given["method_options"])
            given["method_options"] = {m: {**base.method_options.get(m, {}), **flags.get(m, {})}
                                       for m in {**base.method_options, **flags}}
        return dataclasses.replace(base, **given).resolved()


def _resolve_sanity(c: EvalConfig) -> None:
    """The sanity options: only with ``sanity`` (else they would do nothing), in range; the seed 0 by default."""
    if not c.sanity and (c.sanity_layers is not None or c.sanity_seed is not None):
        given = [f"--{k.replace('_', '-')}" for k in ("sanity_layers", "sanity_seed") if getattr(c, k) is not None]
        raise ConfigError(f"{' and '.join(given)} only apply with --sanity: add --sanity, or drop them")
    if c.sanity_layers is not None and c.sanity_layers < 1:
        raise ConfigError(f"sanity_layers must be >= 1 (every K-th layer), got {c.sanity_layers}")
    if c.sanity_seed is not None and c.sanity_seed < 0:
        raise ConfigError(f"sanity_seed must be >= 0, got {c.sanity_seed}")
    if c.sanity and c.sanity_seed is None:
        c.sanity_seed = 0


def _resolve_seed(c: EvalConfig) -> None:
    """The seeded methods' seed: only with one of them (else it would do nothing), >= 0, 0 by default."""
    seeded = any(get_method(m).seeded for m in c.methods)
    if c.seed is not None and not seeded:
        names = [m for m in METHODS.names() if get_method(m).seeded]
        raise ConfigError(f"--seed only applies to the seeded methods ({', '.join(names)}), and --methods has "
                          "none: add one, or drop --seed")
    if c.seed is not None and not 0 <= c.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32) (NumPy's and the rows' range), got {c.seed}")
    if c.seed is None and seeded:
        c.seed = 0



#: the methods' options the job sets through flags of its own; ``--method-option`` refuses them
JOB_OPTIONS = {"batch_size": "--batch-size", "precision": "--precision", "seed": "--seed", "reshape": "--model"}


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["sscam.num_samples=10", "legrad.blocks=3"]`` to ``{"sscam": {"num_samples": 10}, "legrad":
    {"blocks": 3}}``: each value is read as JSON (``10``, ``2.5``, ``true``, ``[1, 2]``, ``"text"``), else
    kept as text (``kernel=rbf``). Raises :class:`ConfigError` for an item not ``METHOD.OPTION=VALUE``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, text = item.partition("=")
        method, dot, option = name.strip().partition(".")
        if not (eq and dot and method and option.strip()):
            raise ConfigError(f"--method-option {item!r}: expected METHOD.OPTION=VALUE (e.g. sscam.num_samples=10)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text.strip()
        out.setdefault(method.strip(), {})[option.strip()] = value
    return out


def check_method_option_values(options: dict[str, dict[str, Any]], model: Any) -> None:
    """Each method of ``options`` built on ``model`` with its options (its own checks of their values),
    before any work. Raises :class:`ConfigError` in one line, whatever the constructor raised."""
    for method, given in options.items():
        try:
            get_method(method)(model, **given).remove_hooks()
        except Exception as exc:
            raise ConfigError(f"--method-option {method}: {' '.join(str(exc).split())}") from None


def _json_value(value: Any) -> bool:
    if isinstance(value, list):
        return all(_json_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _resolve_method_options(c: EvalConfig) -> None:
    c.method_options = check_method_options(c.method_options, c.methods)


def check_method_options(given: dict[str, dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``given`` (``{method: {option: value}}``) checked against ``methods`` (those that run) and each
    method's options (``CAM.option_names``, less :data:`JOB_OPTIONS`), in canonical spelling, each method's
    options sorted, in ``methods``' order; the values are checked by building the method (the job's
    driver, :func:`unioncam.service.runner.check_model`). Raises :class:`ConfigError`."""
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise ConfigError(f"method_options must map a method to a mapping of its options, got {given!r}")
    out: dict[str, dict[str, Any]] = {}
    for method, options in given.items():
        try:
            name = parse_methods([str(method)])[0]
        except ValueError as exc:
            raise ConfigError(f"--method-option {method}: {exc}") from None
        if name not in methods:
            raise ConfigError(f"--method-option for {name}, which does not run here (methods: {', '.join(methods)})")
        allowed = [o for o in get_method(name).option_names() if o not in JOB_OPTIONS]
        for key, value in options.items():
            if key in JOB_OPTIONS:
                raise ConfigError(f"--method-option {name}.{key}: the job sets it for every method; use "
                                  f"{JOB_OPTIONS[key]}")
            if key not in allowed:
                raise ConfigError(f"--method-option {name}.{key}: {name} has no option {key!r}; its options: "
                                  f"{', '.join(allowed) or 'none'}")
            if not _json_value(value):
                raise ConfigError(f"--method-option {name}.{key}: a value must be a number, boolean, string or list, "
                                  f"got {type(value).__name__}")
        merged = {**out.get(name, {}), **options}  # two spellings of one method (YAML and flag): later wins
        out[name] = dict(sorted(merged.items()))
    return {m: out[m] for m in methods if out.get(m)}  # an empty mapping is no option: the run is as without

def _check_numbers(c: EvalConfig) -> None:
    """Counts, resources, times and sizes in range (finite, positive where they must be)."""
    for name in ("workers", "batch_size", "limit"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    for name in ("gpus_per_worker", "cpus_per_worker", "max_gpu_memory", "progress_interval", "start_timeout"):
        value = getattr(c, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    for name in ("gpus_per_worker", "cpus_per_worker", "max_restarts", "max_task_retries"):
        value = getattr(c, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if c.gpus_per_worker is not None and c.gpus_per_worker > 1:
        raise ConfigError(f"gpus_per_worker {c.gpus_per_worker:g} > 1: a worker computes on one GPU (cuda:0), "
                          "so the others would sit idle; use more workers (one per GPU is the default)")
    for name in ("progress_interval", "start_timeout"):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {getattr(c, name)}")
    if c.out is not None and not storage.is_uri(c.out) and os.path.abspath(storage.local_path(c.out)) == "/":
        raise ConfigError("--out / would put the run's folders at the file system's root; choose a folder")
    if not c.max_gpu_memory > 0:
        raise ConfigError(f"max_gpu_memory must be > 0 GiB, got {c.max_gpu_memory}")
    if (c.images_per_batch is not None and c.images_per_batch < 1) or (c.insdel_steps or 0) < 1 or c.overlays < 0:
        raise ConfigError("images_per_batch and insdel_steps must be >= 1, overlays >= 0")


def _unique_key_loader(path: str) -> type:
    """A ``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last silently),
    naming the key and both lines."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"config {path}: key {key!r} is given twice (lines {seen[key]} and {line}); "
                                          "keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: the mapping constructor reports it
                    pass
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _rescoring(c: EvalConfig, protocol: str) -> EvalConfig:
    """``c`` with what a rescore takes from the run it rescores (``c.rescore``'s manifest): dataset,
    model, methods, target, limit and precision are that run's (its maps are reused), the metrics
    those of its metrics that ``c`` asks for, no maps are written, and ``out`` defaults to
    ``RUN_DIR/rescore/<protocol>``."""
    from unioncam.service.rundir import load_manifest

    if c.shards is not None or c.sample:
        raise ConfigError("a rescore reads the shards of the run it rescores: give no --shards")
    if c.seed is not None or c.method_options:  # the maps are the run's: its seed and options made them
        given = " and ".join(f for f, v in (("--seed", c.seed is not None), ("--method-option", c.method_options)) if v)
        raise ConfigError(f"a rescore scores the run's saved maps, made with that run's seed and method options: "
                          f"give no {given}")
    run = storage.absolute(c.rescore or "")
    try:
        then = load_manifest(run)["config"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot rescore {storage.redact(run)}: {exc}") from None
    if then.get("rescore"):
        raise ConfigError(f"{storage.redact(run)} is itself a rescore of {then['rescore']}: rescore that run")
    if not then.get("save_maps", False):
        raise ConfigError(f"{storage.redact(run)} saved no maps (--no-maps), so there is nothing to rescore: rerun "
                          "it with maps")
    missing = [k for k in ("dataset", "model", "methods", "metrics") if not then.get(k)]
    if missing:
        raise ConfigError(f"{storage.redact(run)}'s manifest records no {', '.join(missing)}: a run of another "
                          "unioncam version, which rescore cannot reproduce; rerun it")
    out = storage.absolute(c.out) if c.out else storage.join(run, "rescore", protocol)
    if out == run or any(out == storage.join(run, d) or out.startswith(storage.join(run, d) + "/")
                         for d in ("metrics", "maps", "report", "sanity", "running")):
        raise ConfigError(f"--out {storage.redact(out)} is (inside) the rescored run's own files: choose another "
                          f"folder (default {storage.redact(storage.join(run, 'rescore', protocol))})")
    asked = parse_metrics(c.metrics)
    return dataclasses.replace(
        c, rescore=run, dataset=then["dataset"], model=then["model"], methods=list(then["methods"]),
        metrics=[m for m in then["metrics"] if m in asked], target=then.get("target", "predicted"),
        limit=then.get("limit"), precision=then.get("precision", "auto"), save_maps=False, out=out,
        seed=then.get("seed"), method_options=dict(then.get("method_options") or {}))


def top_k(target: str) -> int | None:
    """K of a ``"topk:K"`` target (K >= 1), else None."""
    match = re.fullmatch(r"topk:([0-9]{1,4})", target) if isinstance(target, str) else None
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


MAX_CONFIG_BYTES = 1 << 20
_HINTS = typing.get_type_hints(EvalConfig)
def _check_type(key: str, value: Any) -> None:
    """One place for the YAML values' types (argparse checks the flags'), read from
    :class:`EvalConfig`'s annotations: ints are ints (not ``"32"``, ``2.5`` or ``true``), floats are
    numbers, booleans are ``true``/``false`` (not ``"no"``), names are strings, lists are lists of
    strings. None (YAML ``null``) means the default."""
    if value is None:
        return
    hint = _HINTS[key]
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    base = typing.get_origin(hint) or hint  # list[str] -> list, Literal[...] -> Literal
    if base is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif base is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif base is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif base is dict:
        ok, want = isinstance(value, dict), "a mapping (method: {option: value})"
    elif base is list:
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), \
            "a list of names or a comma-separated string"
    else:  # str and Literal[...] of strings
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"config key {key!r} must be {want}, got {value!r} ({type(value).__name__})")


def _names(key: str, spec: str) -> list[str]:
    """``"all"`` (every method / metric) or a comma-separated list of ``key``'s names, parsed by
    :func:`unioncam.registry.parse_names` (the parser of :func:`unioncam.methods.parse_methods`)."""
    try:
        if key == "methods":
            return parse_methods(spec)
        return parse_metrics(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_parser(dataset: Dataset | None) -> argparse.ArgumentParser:
    """Flags of ``jobs/eval_<dataset>.py`` (``dataset`` None: a rescore's, whose dataset is the run's);
    every default is None so a YAML value is kept."""
    p = argparse.ArgumentParser(prog=f"eval_{dataset}.py" if dataset else "eval.py",
                                description=f"Evaluate saliency methods on {dataset or 'WebDataset'} shards with Ray.")
    p.add_argument("--config", help="YAML file of options (flags given here override it)")
    p.add_argument("--shards", help="shard list/glob/brace pattern (default: the bundled sample)")
    p.add_argument("--out", help="run directory (default for the sample: runs/sample-<dataset>)")
    p.add_argument("--model", help=f"one of {', '.join(model_names())} (default vgg16; sample: efficientnet_lite0)")
    p.add_argument("--allow-download", action="store_const", const=True,
                   help="let torchvision/timm download missing weights into their own caches (default: never)")
    p.add_argument("--weights", help="state-dict file for the model")
    p.add_argument("--methods", help=f"'all' or comma-separated: {', '.join(METHODS.names())} (default: the papers' "
                                     f"{','.join(default_methods())})")
    p.add_argument("--metrics", help=f"'all' or comma-separated: {', '.join(METRICS.names())} (default: "
                                     f"{','.join(default_metrics())})")
    p.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, or one on CPU)")
    p.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-worker", type=float, help="default: 4 with a GPU, else the cluster's CPUs / workers")
    p.add_argument("--batch-size", type=int, help="masked inputs per forward (default: 4 CPU, 32 GPU)")
    p.add_argument("--images-per-batch", type=int, help="images explained together (default: 1 CPU, 8 GPU)")
    p.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="the methods' masked forwards (default auto: fp16 on GPU workers, fp32 on CPU)")
    p.add_argument("--metrics-precision", choices=PRECISION_CHOICES,
                   help="the metric forwards (default fp32, IEEE; fp16 is faster on GPUs, logits stay fp32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   help="keep conv weights NCHW (channels_last is on by default)")
    p.add_argument("--no-fuse", dest="fuse", action="store_const", const=False,
                   help="run the forward-only passes on the model as it is (by default BatchNorm is folded "
                        "into the convolutions of a copy)")
    p.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the forward-only passes (default: on for GPU workers, off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="never compile (also on GPU workers)")
    p.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                   help="GPU memory per worker that batch sizes are derived from (default 4 GiB)")
    p.add_argument("--limit", type=int, help="evaluate at most N images")
    p.add_argument("--insdel-steps", type=int,
                   help="insertion/deletion steps (default: the protocol's, 224 for reference; sample: 32)")
    p.add_argument("--protocol",
                   help=f"metric conventions, one of {', '.join(PROTOCOL_NAMES)} (default reference: REFERENCE.md; the "
                        "others: those libraries' own, unioncam.evaluation.protocols)")
    p.add_argument("--sanity", action="store_const", const=True,
                   help="also run the cascading parameter randomization sanity check (sanity/*.parquet)")
    p.add_argument("--sanity-layers", type=int, metavar="K",
                   help="with --sanity: compare after every K-th layer from the logits down (default: every layer)")
    p.add_argument("--sanity-seed", type=int, help="with --sanity: the randomization's seed (default 0)")
    p.add_argument("--seed", type=int,
                   help="the seed of the seeded methods (random, sscam, smoothgradcampp; default 0), recorded in "
                        "their rows")
    p.add_argument("--method-option", dest="method_options", action="append", metavar="METHOD.OPTION=VALUE",
                   help="a method's own option, repeatable: sscam.num_samples=10, legrad.blocks=3, "
                        "kpcacam.kernel=rbf (the options: docs/library.md)")
    p.add_argument("--rescore", metavar="RUN_DIR",
                   help="score RUN_DIR's saved maps again under --protocol, into --out (default "
                        "RUN_DIR/rescore/<protocol>), computing no map (what `unioncam rescore` runs)")
    p.add_argument("--target", metavar="predicted|label|topk:K",
                   help="class(es) to explain: the predicted class (default), the label, or the top K predictions")
    p.add_argument("--no-maps", dest="save_maps", action="store_const", const=False, help="skip maps/*.parquet")
    p.add_argument("--no-report", dest="report", action="store_const", const=False, help="skip the report")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster on 127.0.0.1)")
    p.add_argument("--max-restarts", type=int, help="restarts of a dead worker (default 3)")
    p.add_argument("--max-task-retries", type=int, help="retries of a shard whose worker died (default 3)")
    p.add_argument("--start-timeout", type=float, metavar="SECONDS",
                   help="how long a worker may take to start, e.g. while an autoscaler adds a node (default 600)")
    p.add_argument("--progress-interval", type=float, help="seconds between progress lines (default 10)")
    p.add_argument("--overlays", type=int, help="images in the report's overlay grid (default 4)")
    return p
