"""Evaluating one shard: decode, explain with every method, score, write Parquet.

:class:`ShardEvaluator` is plain Python (tested without Ray); :class:`ShardWorker` is the Ray actor
around it: one model replica per actor, on the GPU Ray assigned (``ray.get_gpu_ids()``), else on
CPU with ``torch.set_num_threads`` matching its CPU slots.

Per image and method a row records ``Y = f_c(I0)`` and ``O = f_c(L ⊙ I0)`` (Average Drop /
Increase are recomputed from them), insertion/deletion AUC, the energy pointing game where the
sample has boxes, UnionCAM's β's and AMS branch, and seconds. A sample that cannot be decoded, or a
method that fails on an image, gives rows with ``error`` set; the rest of the shard goes on.

Decisions (see docs/reference-notes.md):
- A method whose maps another requested method computes along the way (the other's ``provides``:
  UnionCAM's ``L_Region`` *is* Score-CAM's map, REFERENCE.md) is taken from it, so its channel
  forwards run once; its rows' ``seconds`` then count only taking the maps over.
- Metrics always run in fp32 whatever ``precision`` the methods use, so a precision's effect on
  Average Drop is the method's alone.
- EPG uses the sample's boxes: for VOC those of its labelled object class (an ImageNet model's
  target class has no VOC boxes of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

import unioncam
from unioncam import storage
from unioncam.data.shards import iter_samples, prefetched, shard_name
from unioncam.data.voc import VOC_CLASSES
from unioncam.engine import default_batch_size, gpu_plan, masked_inputs, predict
from unioncam.evaluation import MapBatch, Metric, MetricContext, metric_classes, protocol_columns, scorers
from unioncam.evaluation.protocols import get_protocol
from unioncam.evaluation.sanity import cascade_steps, sanity_check
from unioncam.methods import CAM, get_method, provided_maps
from unioncam.methods.base import find_layer
from unioncam.models import compiled_graphs, load
from unioncam.ops import autocast, ieee_fp32, is_constant, is_zero, normalize, resolve_precision
from unioncam.service.config import EvalConfig, top_k
from unioncam.service.pool import WorkerStartError
from unioncam.service.results import (
    MAP_DTYPE,
    SANITY_SCHEMA,
    MapsWriter,
    maps_schema,
    metrics_schema,
    provenance_of,
    read_maps_file,
    read_parquet,
    with_provenance,
    write_parquet,
)

Row = dict[str, Any]
MARKER_INTERVAL = 5.0  # seconds between updates of running/<shard>.json
FORWARDS_INTERVAL = 2.0  # seconds between reports of a worker's masked-forward count


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


class ShardEvaluator:
    """One model replica and the requested methods; :meth:`evaluate` does one shard."""

    def __init__(self, cfg: EvalConfig, device: torch.device | str = "cpu", run_id: str = "",
                 free_memory: int | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.loaded = load(cfg.model or "vgg16", cfg.weights, channels_last=cfg.channels_last, fuse=cfg.fuse,
                           allow_download=cfg.allow_download)
        self.model = self.loaded.model.to(self.device)
        self.size = self.loaded.input_size
        self.label_names = VOC_CLASSES if cfg.dataset == "voc" else self.loaded.class_names
        if cfg.dataset == "voc" and cfg.target == "label" and tuple(self.loaded.class_names) != tuple(VOC_CLASSES):
            raise ValueError(f"--target label with VOC shards needs a model of VOC's 20 classes; {self.loaded.name} "
                             f"has {len(self.loaded.class_names)} others, so a VOC label would be explained as "
                             "another class (VOC 7 'cat' as ImageNet 7 'cock')")
        self.protocol = get_protocol(cfg.protocol)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.metrics_precision = resolve_precision(cfg.metrics_precision, self.device)
        gpu = self.device.type == "cuda"
        self.plan = gpu_plan(self.model, self.size, self.precision, cfg.max_gpu_memory, free_memory) \
            if gpu or free_memory is not None else None
        self.batch_size = cfg.batch_size or (self.plan.batch_size if self.plan else default_batch_size(self.device))
        self.images_per_batch = cfg.images_per_batch or (self.plan.images_per_batch if self.plan else 1)
        self.compile = cfg.compile if cfg.compile is not None else gpu
        self.warmup_seconds = 0.0
        if self.compile:
            self.model.compile_inference(pad_to=self.batch_size)
            self.warmup_seconds = self._warm_up()
        self.provided = {m: p for m, p in provided_maps(cfg.methods).items()  # computed by another: not run again
                         if m not in cfg.method_options and p[0] not in cfg.method_options}  # (unless options differ)
        context = MetricContext(self.model, self.size, self.batch_size, self.metrics_precision, self.protocol,
                                cfg.insdel_steps)
        self.scorers: list[Metric] = [cls(context) for cls in scorers(cfg.metrics)]
        self.per_map = sum(m.forwards_per_map() for m in self.scorers)  # masked inputs per scored map
        self.schema = metrics_schema()  # the registered metrics' columns, as this worker writes them
        self.columns = frozenset(self.schema.names)
        self.batch_start, self.needed, self.batch_images = masked_inputs(), 0, 0  # progress within a batch
        self.cams: dict[str, CAM] = {m: self._build(m, self.model) for m in cfg.methods if m not in self.provided}
        self.sanity_rows: list[Row] = []
        self.layer_seeds: dict[str, int] = {}
        self.provenance = {
            "run_id": run_id, "dataset": cfg.dataset, "model": self.loaded.name,
            "weights_sha256": self.loaded.weights_sha256, "target_layer": self.loaded.target_layer,
            "input_size": list(self.size), "precision": self.precision, "metrics_precision": self.metrics_precision,
            "target": cfg.target, "channels_last": cfg.channels_last, "fuse": cfg.fuse,
            "compile": self.compile,
            "insdel_steps": cfg.insdel_steps, "protocol": self.protocol.name,
            **({"seed": cfg.seed} if cfg.seed is not None else {}),  # the seeded methods' (only when one runs)
            **({"method_options": cfg.method_options} if cfg.method_options else {}),
            **{k: v for cls in metric_classes() for k, v in cls.provenance(cls.name in cfg.metrics).items()},
            "rescore_of": storage.redact(cfg.rescore) if cfg.rescore else None,
            "unioncam_version": unioncam.__version__, "torch_version": torch.__version__,
            "ray_version": _ray_version(), "device": str(self.device)}

    def forwards_needed(self, x: Tensor, repeat: int = 1) -> int:
        """The masked inputs explaining and scoring the images ``x`` (each for ``repeat`` targets) will
        run, for progress within a batch of images, from what each method run declares
        (:meth:`unioncam.methods.CAM.masked_forwards`): one per *non-constant* channel of the target
        layer on these images for each ``channel_forwards`` method (Score-CAM, UnionCAM; SS-CAM: every
        channel not 0 everywhere, per sample; one hooked forward counts the channels, in IEEE fp32 as the
        explaining forward runs), ``extra_forwards`` per image (UnionCAM's 2 β inputs, ``L_Den`` and
        ``L_Reg``), and each metric's ``forwards_per_map`` per map. Exact without ``sanity``, except work
        a method does only sometimes (UnionCAM's third β input, ``L_Dereg``, when AMS needs it;
        Ablation-CAM's channels already at the ablation value, which it skips; IS-CAM's equal maps,
        forwarded once; Group-CAM's constant groups), which the count may pass (the driver shows it
        capped at the total) or stop short of until the batch ends; with ``sanity`` the randomized
        models' constant and dead channels are taken as the original's."""
        maps = x.shape[0] * repeat * len(self.cfg.methods)
        if self.cfg.rescore:  # the maps are read, not computed
            return maps * self.per_map
        channels = active = live = 0
        if any(cam.channel_forwards for cam in self.cams.values()):
            layer = find_layer(self.model, None)
            grid = self.model.reshape_transform or (lambda out: out)  # transformers: channels of the token grid
            seen: list[tuple[int, int, int]] = []

            def count(_m: Any, _i: Any, out: Tensor) -> None:  # channel maps in all, non-constant, not all 0
                maps = grid(out)
                seen.append((maps.shape[0] * maps.shape[1], int((~is_constant(maps)).sum()),
                             int((~is_zero(maps)).sum())))

            handle = layer.register_forward_hook(count)
            try:  # no_grad, not inference_mode: the eager forward, so a compiled graph never sees this hook
                with torch.no_grad(), ieee_fp32():  # as the explaining forward: no TF32 to move a channel near 0
                    self.model(x)
            finally:
                handle.remove()
            channels, active, live = (n * repeat for n in seen[0]) if seen else (0, 0, 0)
        images = x.shape[0] * repeat
        explaining = sum(cam.masked_forwards(images, channels, active, live) for cam in self.cams.values())
        if self.cfg.sanity:  # the maps again on the original and at every cascade step (+ step 0)
            explaining *= 2 + len(cascade_steps(self.model, self.cfg.sanity_layers))
        return explaining + maps * self.per_map

    def _begin_batch(self, needed: int, images: int) -> None:
        """Mark the start of a batch of images: progress counts masked inputs from here, of ``needed``."""
        self.batch_start, self.needed, self.batch_images = masked_inputs(), needed, images

    def _warm_up(self) -> float:
        """Compile the grad-free forward for every setting a shard uses (the methods' precision and the
        metrics' precision) at the one padded batch shape, before the first shard; returns the seconds."""
        start = time.perf_counter()
        x = torch.zeros((1, 3, *self.size), device=self.device)
        for precision in dict.fromkeys((self.precision, self.metrics_precision)):
            with torch.inference_mode(), autocast(self.device, precision):
                self.model(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # -- one shard -------------------------------------------------------------------------------
    def evaluate(self, shard: str, out: str, limit: int | None = None,
                 on_progress: Callable[[int], None] | None = None, expected: int | None = None) -> dict[str, Any]:
        """:meth:`compute` then :meth:`write`: one shard, start to finish."""
        return self.write(self.compute(shard, limit, on_progress, expected), out)

    def compute(self, shard: str, limit: int | None = None, on_progress: Callable[[int], None] | None = None,
                expected: int | None = None) -> dict[str, Any]:
        """Evaluate the first ``limit`` samples of ``shard`` into rows and maps (for :meth:`write`).
        ``expected``: the sample count the shard set's manifest lists; a shard that holds fewer gets
        an error record saying so.

        Raises:
            storage.StorageError: the shard could not be read (I/O, after retries): nothing is
                written, and the shard stays retryable.
        """
        start = time.perf_counter()
        name = shard_name(shard)
        # what these rows were computed from: its size and stamp now (and ETag on S3); its sha256 is taken
        # while it is decoded (one read), except for a rescore, which compares it before anything is read
        source = storage.fingerprint(storage.absolute(shard), content=bool(self.cfg.rescore))
        digest = hashlib.sha256() if not self.cfg.rescore and "etag" not in source else None
        prov = {**self.provenance, "shard_path": source["uri"], "source": source}
        rows: list[Row] = []
        self.sanity_rows = []
        maps = MapsWriter(with_provenance(maps_schema(self.size), {**prov, "map_shape": list(self.size),
                                                                   "map_dtype": MAP_DTYPE}))
        try:
            if self.cfg.rescore:
                seen = self._rescore(shard, name, limit, on_progress, rows, source)
            else:
                seen = self._compute(shard, name, limit, on_progress, expected, rows, maps, digest)
        except BaseException:
            maps.discard()
            raise
        if digest is not None:
            source["sha256"] = digest.hexdigest()  # the metrics file's provenance and the manifest record it
        return {"name": name, "shard": shard, "rows": rows, "maps": maps, "images": seen, "start": start,
                "source": source, "provenance": prov, "sanity": self.sanity_rows}

    def _compute(self, shard: str, name: str, limit: int | None, on_progress: Callable[[int], None] | None,
                 expected: int | None, rows: list[Row], maps: MapsWriter, digest: Any = None) -> int:
        batch: list[dict[str, Any]] = []
        seen = 0
        samples = prefetched(iter_samples(shard, self.size, digest), depth=2 * self.images_per_batch)
        for record in samples:
            if limit is not None and seen >= limit:
                samples.close()  # the reader stops (hashing the rest of the shard) before the digest is taken
                break
            seen += 1
            if "error" in record:
                rows += [self._row(record, m, error=record["error"]) for m in self.cfg.methods]
            else:
                batch.append(record)
            if len(batch) >= self.images_per_batch:
                self._evaluate_batch(batch, rows, maps)
                batch = []
            if on_progress is not None and not batch:
                on_progress(seen)
        if batch:
            self._evaluate_batch(batch, rows, maps)
        want = expected if limit is None else min(expected, limit) if expected is not None else None
        if want is not None and seen < want:
            record = {"key": f"{name}:missing", "shard": name,
                      "error": f"the shard ends after {seen} samples; its manifest lists {want}"}
            rows += [self._row(record, m, error=record["error"]) for m in self.cfg.methods]
        if on_progress is not None:
            on_progress(seen)
        for row in rows:
            row["shard"] = name
        return seen

    def _rescore(self, shard: str, name: str, limit: int | None, on_progress: Callable[[int], None] | None,
                 rows: list[Row], source: dict[str, Any]) -> int:
        """The rows of the run being rescored (``cfg.rescore``) for this shard, in its order, with this
        run's metrics computed again under its protocol from the saved maps (as saved: float16) and
        the rows' targets. Y, O and insertion/deletion are never copied (null when not computed: they
        are the other protocol's); EPG and ROAD, which no protocol changes, are copied unless
        computed; β's, AMS branch and the map's seconds are copied, error rows kept as they are. The
        run's files are only read.

        Raises:
            ValueError: the shard's bytes changed since the rescored run read them, or its maps are
                of another size than the model's input.
        """
        run = self.cfg.rescore or ""
        metrics_file = storage.join(run, "metrics", f"{name}.parquet")
        then = provenance_of(metrics_file).get("source") or {}
        if any(field in then and then[field] != source.get(field) for field in ("bytes", "sha256", "etag")):
            raise ValueError(f"shard {name} changed since {storage.redact(run)} read it, so its maps explain other "
                             "images: rescore needs the bytes the run was computed from")
        out = read_parquet(metrics_file).to_pylist()
        saved: Any = None
        where: dict[tuple[Any, ...], int] = {}
        if any(row["error"] is None for row in out):  # a shard of error rows only has no maps to read
            table, shape = read_maps_file(storage.join(run, "maps", f"{name}.parquet"))  # float16, as stored
            if tuple(shape) != tuple(self.size):
                raise ValueError(f"shard {name}'s maps are {shape[0]}×{shape[1]}, the model takes {self.size[0]}×"
                                 f"{self.size[1]}: rescore with the run's model")
            saved = table.column("map").combine_chunks()  # each batch converts only its own maps to float32
            keys = zip(*(table.column(c).to_pylist() for c in ("key", "method", "rank")), strict=True)
            where = {(k, m, r): i for i, (k, m, r) in enumerate(keys)}
        # the protocol's columns are always cleared (never another protocol's values under this one's name);
        # the others (EPG, ROAD: no protocol changes them) keep the run's values unless rescored
        redone = list(dict.fromkeys([*protocol_columns(), *(c for cls in metric_classes(self.cfg.metrics)
                                                            for c in cls.columns)]))
        wanted: dict[str, list[int]] = {}  # key -> its rows to score again
        for j, row in enumerate(out):
            if row["error"] is None:
                row.update(dict.fromkeys(redone))
                wanted.setdefault(row["key"], []).append(j)
        seen = 0
        batch: list[tuple[dict[str, Any], list[int]]] = []
        for record in prefetched(iter_samples(shard, self.size), depth=2 * self.images_per_batch):
            if not wanted or (limit is not None and seen >= limit):
                break
            seen += 1
            js = wanted.pop(record["key"], [])
            if js and "error" in record:
                for j in js:
                    out[j]["error"] = f"the sample no longer decodes: {record['error']}"
            elif js:
                batch.append((record, js))
            if len(batch) >= self.images_per_batch:
                self._rescore_batch(batch, out, where, saved)
                batch = []
            if on_progress is not None and not batch:
                on_progress(seen)
        if batch:
            self._rescore_batch(batch, out, where, saved)
        for js in wanted.values():
            for j in js:
                out[j]["error"] = "the sample is not in the shard any more"
        if on_progress is not None:
            on_progress(seen)
        rows += out
        return seen

    def _rescore_batch(self, batch: list[tuple[dict[str, Any], list[int]]], out: list[Row],
                       where: dict[tuple[Any, ...], int], saved: Any) -> None:
        items = []
        for record, js in batch:
            for j in js:
                i = where.get((out[j]["key"], out[j]["method"], out[j]["rank"]))
                if i is None:
                    out[j]["error"] = "the rescored run saved no map for this row"
                else:
                    items.append((record, j, i))
        if not items:
            return
        self._begin_batch(len(items) * self.per_map, len(batch))
        x = torch.stack([record["image"] for record, _, _ in items]).to(self.device)
        targets = torch.tensor([out[j]["target"] for _, j, _ in items], device=self.device)
        maps = [torch.from_numpy(saved[i].values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(self.size))
                .to(self.device) for _, _, i in items]
        values = self._score_all([record for record, _, _ in items], x, targets, maps, list(range(len(items))))
        for (_, j, _), value in zip(items, values, strict=True):
            if isinstance(value, str):
                out[j]["error"] = value
            else:
                out[j].update(value)

    def write(self, computed: dict[str, Any], out: str) -> dict[str, Any]:
        """Write what :meth:`compute` returned as ``out/metrics/<name>.parquet`` (and the maps file);
        returns the counts. Separate from computing so a worker can write one shard while the GPU
        computes the next (:class:`ShardWorker`)."""
        name, rows, maps, seen, start, source, prov = (
            computed[k] for k in ("name", "rows", "maps", "images", "start", "source", "provenance"))
        files: dict[str, Any] = {}  # each file's size, sha256 as written and stamp: the manifest entry's
        try:
            if self.cfg.save_maps:
                files["maps"] = maps.commit(storage.join(out, "maps", f"{name}.parquet"))
        finally:
            maps.discard()
        if self.cfg.sanity:  # before the metrics file: a shard whose metrics exist has its sanity rows too
            sanity_prov = {**prov, "sanity_seed": self.cfg.sanity_seed, "sanity_layers": self.cfg.sanity_layers,
                           "sanity_seeding": "distinct", "sanity_layer_seeds": self.layer_seeds}
            files["sanity"] = write_parquet(computed["sanity"], with_provenance(SANITY_SCHEMA, sanity_prov),
                                            storage.join(out, "sanity", f"{name}.parquet"))
        files["metrics"] = write_parquet(rows, with_provenance(self.schema, prov),
                                         storage.join(out, "metrics", f"{name}.parquet"))
        return {"images": seen, "rows": len(rows), "maps": len(maps) if self.cfg.save_maps else 0, "source": source,
                "files": files,
                **({"sanity": len(computed["sanity"])} if self.cfg.sanity else {}),
                "errors": sum(r["error"] is not None for r in rows), "seconds": time.perf_counter() - start,
                "compiled_graphs": compiled_graphs() if self.compile else 0}

    def _row(self, sample: dict[str, Any], method: str, **values: Any) -> Row:
        label = sample.get("label")
        row: Row = dict.fromkeys(self.schema.names)
        row.update(key=sample["key"], shard=sample.get("shard", ""), method=method, label=label,
                   label_name=self.label_names[label] if label is not None and 0 <= label < len(self.label_names)
                   else None)
        row.update(values)
        return row

    def _evaluate_batch(self, batch: list[dict[str, Any]], rows: list[Row], maps: MapsWriter) -> None:
        if self.cfg.target == "label":  # explain the labels in range; the others get error rows
            n_classes = len(self.loaded.class_names)
            for s in batch:
                if not 0 <= s["label"] < n_classes:
                    rows += [self._row(s, m, error=f"label {s['label']} outside the model's {n_classes} classes")
                             for m in self.cfg.methods]
            batch = [s for s in batch if 0 <= s["label"] < n_classes]
            if not batch:
                return
        x = torch.stack([s["image"] for s in batch]).to(self.device, non_blocking=True)
        ranks: list[int | None]
        if self.cfg.target == "label":
            targets = torch.tensor([s["label"] for s in batch], device=self.device)
            ranks = [None] * len(batch)
        elif (k := top_k(self.cfg.target)) is not None:  # K rows per image: its K most probable classes
            k = min(k, len(self.loaded.class_names))
            logits = predict(self.model, x)[1]
            targets = logits.topk(k, dim=1).indices.flatten().clone()  # cloned: an ordinary tensor for backward
            batch = [s for s in batch for _ in range(k)]
            x = x.repeat_interleave(k, dim=0)
            ranks = [r for _ in range(x.shape[0] // k) for r in range(1, k + 1)]
        else:
            targets = predict(self.model, x)[0]  # an ordinary tensor: the methods' backward uses it
            ranks = [1] * len(batch)
        repeat = len(ranks) // len({id(s) for s in batch})  # topk:K repeats each image K times
        self._begin_batch(self.forwards_needed(x[::repeat], repeat), len(batch) // repeat)
        outcomes = self._explain_all(x, targets)
        done = [(m, i) for m, per_image in outcomes.items() for i, o in enumerate(per_image) if not isinstance(o, str)]
        to_score = [o[0] for per_image in outcomes.values() for o in per_image if not isinstance(o, str)]  # done's maps
        values = self._score_all(batch, x, targets, to_score, [i for _, i in done])
        scored = dict(zip(done, values, strict=True))
        for method, per_image in outcomes.items():
            for i, (sample, outcome) in enumerate(zip(batch, per_image, strict=True)):
                target = int(targets[i])
                common = {"target": target, "target_name": self.loaded.class_names[target], "rank": ranks[i]}
                value = scored.get((method, i))
                if isinstance(outcome, str) or isinstance(value, str):
                    rows.append(self._row(sample, method, error=outcome if isinstance(outcome, str) else value,
                                          **common))
                    continue
                saliency, details, seconds = outcome
                kept = {k: v for k, v in details.items() if k in self.columns}
                rows.append(self._row(sample, method, seconds=seconds, **common, **(value or {}), **kept))
                if self.cfg.save_maps:
                    maps.append({"key": sample["key"], "method": method, "rank": ranks[i],
                                 "map": saliency.detach().to(torch.float16).cpu().numpy()})
        if self.cfg.sanity:
            self._sanity(batch, x, targets, ranks)

    def _sanity(self, batch: list[dict[str, Any]], x: Tensor, targets: Tensor, ranks: list[int | None]) -> None:
        """The cascading randomization check (:func:`unioncam.evaluation.sanity.sanity_check`) of every method on
        this batch, into :attr:`sanity_rows`; a batch that fails is retried image by image, and an
        image that fails alone gets one error row per method."""
        try:
            result = sanity_check(self.model, self._sanity_methods(), x, targets, seed=self.cfg.sanity_seed or 0,
                                  layers=self.cfg.sanity_layers)
        except Exception as exc:  # isolate the failure per image, as _explain does
            if x.shape[0] > 1:
                for i in range(x.shape[0]):
                    self._sanity(batch[i:i + 1], x[i:i + 1], targets[i:i + 1], ranks[i:i + 1])
                return
            self.sanity_rows += [{"key": batch[0]["key"], "method": m, "rank": ranks[0], "target": int(targets[0]),
                                  "step": None, "layer": None, "spearman": None, "ssim": None, "failed": None,
                                  "error": _error_text(exc)} for m in self.cfg.methods]
            return
        self.layer_seeds = result.layer_seeds
        for r in result.rows():
            i = r["image"]
            self.sanity_rows.append({"key": batch[i]["key"], "method": r["method"], "rank": ranks[i],
                                     "target": r["target"], "step": r["step"], "layer": r["layer"],
                                     "spearman": r["spearman"], "ssim": r["ssim"], "failed": r["failed"],
                                     "error": None})

    def _sanity_methods(self) -> dict[str, Callable[[torch.nn.Module], CAM]]:
        """Each method built on a randomized copy with this worker's options."""
        def build(name: str) -> Callable[[torch.nn.Module], CAM]:
            return lambda model: self._build(name, model)
        return {m: build(m) for m in self.cfg.methods}

    def _build(self, method: str, model: torch.nn.Module) -> CAM:
        """``method`` on ``model`` with this worker's options, the run's ``seed`` for a seeded method and the
        method's own options (``--method-option``)."""
        cls = get_method(method)
        options: dict[str, Any] = {"seed": self.cfg.seed or 0} if cls.seeded else {}
        options.update(self.cfg.method_options.get(method, {}))
        return cls(model, batch_size=self.batch_size, precision=self.precision, **options)

    def _explain_all(self, x: Tensor, targets: Tensor) -> dict[str, list[tuple[Tensor, Row, float] | str]]:
        """Per method, per image: ``(map, details, seconds)`` or an error message."""
        results: dict[str, list[tuple[Tensor, Row, float] | str]] = {}
        for method, cam in self.cams.items():
            cls = get_method(method)
            results[method] = self._explain(cam, x, targets, (*cls.detail_columns(), *cls.provides.values()))
        for other, (provider, key) in self.provided.items():  # maps a run method computed along the way
            taken: list[tuple[Tensor, Row, float] | str] = []
            for outcome in results[provider]:
                if isinstance(outcome, str):
                    taken.append(outcome)
                    continue
                t0 = time.perf_counter()
                taken.append((normalize(outcome[1][key][None])[0], {}, time.perf_counter() - t0))
            results[other] = taken
        return {m: results[m] for m in self.cfg.methods}

    def _explain(self, cam: CAM, x: Tensor, targets: Tensor,
                 keys: tuple[str, ...]) -> list[tuple[Tensor, Row, float] | str]:
        """The batch at once; if that fails, image by image so one bad image costs only itself.
        ``keys``: the details to keep per image (the method's ``row_details`` and provided maps)."""
        try:
            t0 = time.perf_counter()
            result = cam(x, targets)
            seconds = (time.perf_counter() - t0) / x.shape[0]
            return [(result.maps[i], _details_at(result.details, i, keys), seconds) for i in range(x.shape[0])]
        except Exception as exc:  # any failure: isolate it per image below
            if x.shape[0] == 1:
                return [_error_text(exc)]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return [o for i in range(x.shape[0]) for o in self._explain(cam, x[i:i + 1], targets[i:i + 1], keys)]

    def _score_all(self, batch: list[dict[str, Any]], x: Tensor, targets: Tensor, saliency: list[Tensor],
                   index: list[int]) -> list[Row | str]:
        """Metric values (or an error text) for maps of several images *and methods* at once
        (``saliency[j]`` explains image ``index[j]``), so the metric forwards fill whole batches.
        If the batch fails, each map is scored alone, so one failure costs one row. Y = 0 (label
        targets) and non-finite confidences are errors of their own row."""
        if not saliency:
            return []
        try:
            return self._metrics(batch, x, targets, torch.stack(saliency).float(), index)
        except Exception as exc:
            if len(saliency) == 1:
                return [_error_text(exc)]
        return [v for j, m in enumerate(saliency) for v in self._score_all(batch, x, targets, [m], [index[j]])]

    def _metrics(self, batch: list[dict[str, Any]], x: Tensor, targets: Tensor, m: Tensor,
                 index: list[int]) -> list[Row | str]:
        """Every requested metric's values for the maps ``m`` (``m[j]`` explains image ``index[j]``);
        a map that one metric finds an error for (Y = 0, say) is an error row."""
        idx = torch.tensor(index, device=x.device)
        maps = MapBatch(x[idx], m, targets[idx], [batch[i]["key"] for i in index],
                        [batch[i].get("boxes") for i in index])
        values: list[Row | str] = [{} for _ in index]
        for metric in self.scorers:
            for j, value in enumerate(metric.score(maps)):
                current = values[j]
                if isinstance(current, dict):
                    if isinstance(value, str):
                        values[j] = value
                    else:
                        current.update(value)
        return values


def _details_at(details: dict[str, Any], i: int, keys: tuple[str, ...]) -> Row:
    """Image ``i``'s ``keys`` of a method's details (its detail columns and the maps it provides to
    other methods) as row values: integers as ints (a seed), other numbers as floats (NaN becomes
    null), text as is ("" becomes null), tensors (maps) as the image's."""
    out: Row = {}
    for key in keys:
        if key not in details:
            continue
        value = details[key][i]
        if isinstance(value, Tensor) and value.dim() > 0:
            out[key] = value
        elif isinstance(value, str):
            out[key] = value or None
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = int(value)
        else:
            v = float(value)
            out[key] = None if np.isnan(v) else v
    return out


def _ray_version() -> str | None:
    try:
        import ray

        return str(ray.__version__)
    except ImportError:
        return None


class ShardWorker:
    """The Ray actor (made remote by the runner): one :class:`ShardEvaluator` on its own device.

    It runs two shard tasks at a time (``max_concurrency=2``): the compute of one holds
    :attr:`computing`, so the device does one shard at a time, while the other's Parquet files are
    encoded and written (a PUT on object stores) beside it, so writing never stalls the GPU."""

    def __init__(self, cfg: EvalConfig, run_id: str, progress: str | None = None) -> None:
        import ray

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        if self.gpu_ids and torch.cuda.is_available():
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
        else:
            device = torch.device("cpu")
            if self.gpu_ids:
                print(f"[unioncam] worker {os.getpid()}: GPU {self.gpu_ids} assigned but CUDA is unavailable; "
                      "running on CPU", flush=True)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.start_error: str | None = None
        start = time.perf_counter()
        try:
            self.evaluator = ShardEvaluator(cfg, device, run_id)
        except Exception as exc:  # reported by info() in one line, not as Ray's actor-creation traceback
            self.start_error = " ".join(_error_text(exc).split())[:1000]
            return
        e = self.evaluator
        plan = (f", GPU plan: {e.plan.per_input / 2**20:.1f} MiB per masked input within "
                f"{e.plan.budget / 2**30:.2f} GiB") if e.plan else ""
        warm = f"; compiled and warmed up in {e.warmup_seconds:.1f} s ({compiled_graphs()} graphs)" if e.compile else ""
        print(f"[unioncam] worker {os.getpid()} on {device}: {e.precision}, batch {e.batch_size}, "
              f"{e.images_per_batch} image(s) per call{plan}; ready in {time.perf_counter() - start:.1f} s{warm}",
              flush=True)
        self.progress = ray.get_actor(progress) if progress else None  # a name: handles in args break restarts
        self.out = cfg.out or "."
        self.computing = threading.Lock()
        self.sending = threading.Lock()  # one report of masked forwards at a time (the thread's, or run()'s last)
        self.sent: tuple[int, int, int] = (0, 0, 0)  # the last (done, needed, images) reported
        if self.progress is not None:  # within-image progress: this process's masked forwards, every few s
            threading.Thread(target=self._report_forwards, name="unioncam-forwards", daemon=True).start()

    def _report_forwards(self) -> None:
        """Every few seconds, while a shard computes: the masked forwards done since its current batch
        of images began, of how many that batch needs (:meth:`ShardEvaluator.forwards_needed`), and
        its image count (the driver's ETA moves within a batch)."""
        while True:
            with self.sending:
                e = self.evaluator
                current = (masked_inputs() - e.batch_start, e.needed, e.batch_images) \
                    if self.computing.locked() and e.needed else (0, 0, 0)
                if current != self.sent and self.progress is not None:
                    self.progress.update_forwards.remote(os.getpid(), *current)
                    self.sent = current
            time.sleep(FORWARDS_INTERVAL)

    def _forwards_done(self) -> None:
        """A shard's compute ended: clear this worker's within-batch count before its result reaches
        the driver (so a finished shard never shows a stale count)."""
        with self.sending:
            if self.progress is not None and self.sent != (0, 0, 0):
                import ray

                ray.get(self.progress.update_forwards.remote(os.getpid(), 0, 0, 0))
                self.sent = (0, 0, 0)

    def info(self) -> dict[str, Any]:
        """Where this worker runs: pid, host, Ray node, GPU ids, torch device, threads; or, for a
        worker that could not start, ``{"error": why}``."""
        if self.start_error is not None:
            return {"error": self.start_error}
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": self.node_id,
                "gpu_ids": self.gpu_ids, "device": str(self.evaluator.device), "threads": torch.get_num_threads()}

    def run(self, shard: str, limit: int | None, expected: int | None = None) -> dict[str, Any]:
        """Evaluate one shard; a marker in ``out/running/`` says who works on it until it ends
        (removed however it ends; one left behind means the worker process was killed)."""
        if self.start_error is not None:  # a restarted worker that could not start again: the driver stops
            raise WorkerStartError(f"a worker could not start: {self.start_error}")
        name = shard_name(shard)
        marker = storage.join(self.out, "running", f"{name}.json")
        info = self.info()
        last = [0.0]

        def progress(done: int) -> None:
            if self.progress is not None:
                self.progress.update.remote(name, done)
            now = time.monotonic()
            if now - last[0] >= MARKER_INTERVAL or done == 0:  # one small PUT at most every few seconds
                last[0] = now
                storage.write_text(marker, json.dumps({**info, "shard": name, "done": done}), durable=False)

        try:
            progress(0)
            with self.computing:  # one shard on the device at a time; the write below overlaps the next one
                try:
                    computed = self.evaluator.compute(shard, limit, progress, expected)
                finally:
                    self.evaluator.needed = 0
            self._forwards_done()
            result = self.evaluator.write(computed, self.out)
        finally:
            storage.delete(marker)
        return {**result, "worker": info}
