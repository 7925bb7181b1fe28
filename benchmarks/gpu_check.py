"""The GPU check (issue 27): every CUDA path of the project and its figures, measured in one prepared run.

    bash benchmarks/gpu_check.sh [options]          # on a lent GPU machine: installs gpu-wheels/, then runs this
    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--address RAY_ADDRESS] [--out-dir DIR]
                                   [--budget-s 450] [--skip tests,job,inprocess,methods,cpu] ...

In order, within ``--budget-s`` (what does not fit is skipped, and its row says so):

1. **tests**: the CUDA-marked tests (``pytest -m cuda`` over the test files that mark some; skipped
   without CUDA).
2. **job**: writes ``--shards`` × ``--per-shard`` real photos (the labelled sample photos of
   scikit-image and matplotlib, cropped, flipped and resized into distinct variations), VGG16 with
   seeded random weights written to a file, and runs the evaluation job (``jobs/eval_imagenet.py``)
   with its default flags but ``--methods unioncam --metrics ad,ai --workers 1`` (``--address``: on
   that Ray cluster, else on a fresh local Ray on 127.0.0.1). From the run's manifest: in-shard img/s
   (Σ images / Σ shard seconds: decoding, explaining, scoring and writing); from the worker's start
   line: precision, batch sizes, compile and warm-up seconds, graphs compiled (and the driver's
   recompile warnings); the worker's peak GPU memory, sampled through NVML while the job runs.
   **inprocess**: then the library in this process (``unioncam.explain`` + ``confidence``) on the
   same decoded images with the job's resolved settings (precision, batch size, images per call,
   channels_last, compile with one padded shape and the same warm-up, threads): img/s, peak GPU
   memory, and the ratio job / in-process.
3. **methods**: every registered method (``unioncam.METHODS``) and every registered metric
   (``unioncam.evaluation.METRICS``: AD/AI, insertion/deletion at ``--insdel-steps`` (224), EPG with a
   centre box, ROAD) and the sanity cascade, once each on ``--device`` over ``--images`` photos:
   seconds per image. **cpu**: the same methods on the CPU in IEEE fp32 over the first
   ``--compare-images``: Pearson of the maps per image (min over images), Average Drop / Increase
   difference (device − CPU, in points), max |map difference|.
4. One summary table (and the per-method table), printed and written with the logs to ``--out-dir``
   (``$OUT`` when set, else ``out/gpu-check/``): ``summary.md``, ``summary.json``, ``gpu_check.log``,
   ``job.log``, ``pytest.log``, the job's ``manifest.json``.

``--device cpu --quick`` is the dry run CI makes (tests/test_gpu_check.py): ``tiny_cnn``, 2 shards × 2
photos, the job's worker on 1 CPU, the methods on 1 image of 64×64, insertion/deletion at 16 steps,
the metrics other than AD/AI and the sanity cascade on the first method's maps only. Nothing is
downloaded: the photos are files of installed packages and the weights are written here. The exit
code is 1 when a part failed to run (an error row), else 0, targets met or not. Uses only torch APIs
older than torch 2.11 (the GPU machine's).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PARTS = ("tests", "job", "inprocess", "methods", "cpu")
PREFIX = "gpu-check"
JOB_METHOD = "unioncam"
GIB = float(1 << 30)


# -- output ------------------------------------------------------------------------------------------
class Log:
    """Lines to stdout and to ``gpu_check.log``."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, message: str = "") -> None:
        print(message, flush=True)
        self.file.write(message + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class Row:
    """One row of the summary table: ``value`` is the number the ``target`` is about (None: no number)."""

    check: str
    value: float | None = None
    unit: str = ""
    note: str = ""
    target: str = ""
    status: str = "info"  # ok | below target | info | n/a | skipped | error

    def cell(self) -> str:
        if self.value is None:
            return "-"
        v = self.value
        if self.unit in ("shards", "passed", "graphs", "masked inputs per forward"):
            text = f"{v:.0f}"
        elif self.unit == "Pearson":
            text = f"{v:.5f}"
        else:
            text = f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return f"{text} {self.unit}".strip()


def status(meets: bool | None) -> str:
    return "info" if meets is None else "ok" if meets else "below target"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    clean = [[str(c).replace("|", "/").replace("\n", " ") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *["| " + " | ".join(r) + " |" for r in clean]])


# -- the machine -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{torch.cuda.get_device_name(device)} ({props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda})"
    else:
        where = "no GPU used" + (" (CUDA present)" if torch.cuda.is_available() else "")
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPU cores ({platform.machine()}), device "
            f"{device}: {where}; Python {platform.python_version()}, torch {torch.__version__}, ray {version('ray')}, "
            f"{torch.get_num_threads()} threads")


class GPUMemory:
    """The GPU's used memory sampled every ``interval`` s in a thread (NVML through pynvml, else
    ``nvidia-smi``): the device's total, and per process where NVML reports it."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.interval, self.nvml, self.handle, self.why = interval, None, None, None
        self.index = device.index or 0
        if device.type != "cuda":
            self.why = "no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # pynvml missing or NVML unusable: nvidia-smi, if any
            if shutil.which("nvidia-smi") is None:
                self.why = f"neither pynvml ({type(exc).__name__}) nor nvidia-smi"

    def read(self) -> tuple[int, dict[int, int]]:
        """(bytes used on the device, {pid: bytes} where known)."""
        if self.nvml is not None:
            used = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            procs: dict[int, int] = {}
            with contextlib.suppress(Exception):
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.usedGpuMemory:
                        procs[int(p.pid)] = int(p.usedGpuMemory)
            return used, procs
        out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        used = int(float(out.stdout.strip().splitlines()[0])) << 20
        apps = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        procs = {}
        for line in apps.stdout.strip().splitlines():
            with contextlib.suppress(ValueError):
                pid, mib = (s.strip() for s in line.split(","))
                procs[int(pid)] = int(float(mib)) << 20
        return used, procs

    @contextlib.contextmanager
    def sampling(self) -> Iterator[dict[str, Any]]:
        """Yields a dict that holds, after the block: ``baseline``, ``peak`` (device bytes) and
        ``per_pid`` (peak bytes per process), or ``why`` it could not sample."""
        found: dict[str, Any] = {"why": self.why, "baseline": 0, "peak": 0, "per_pid": {}}
        if self.why is not None:
            yield found
            return
        try:
            found["baseline"] = found["peak"] = self.read()[0]
        except Exception as exc:
            found["why"] = f"{type(exc).__name__}: {exc}"
            yield found
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    used, procs = self.read()
                except Exception:
                    return
                found["peak"] = max(found["peak"], used)
                for pid, size in procs.items():
                    found["per_pid"][pid] = max(found["per_pid"].get(pid, 0), size)
                stop.wait(self.interval)

        thread = threading.Thread(target=loop, name="gpu-memory", daemon=True)
        thread.start()
        try:
            yield found
        finally:
            stop.set()
            thread.join(timeout=30)


# -- the data ----------------------------------------------------------------------------------------
def write_photo_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """``shards × per_shard`` distinct JPEGs: the labelled sample photos (scikit-image's and
    matplotlib's grace_hopper.jpg, :data:`unioncam.data.sample.IMAGENET_LABELS`), then seeded
    variations of them (a crop of 55-100% of each side, a horizontal flip half of the time, the
    short side resized to 160-320 px), in WebDataset shards written by the library."""
    from PIL import Image

    from unioncam.data.sample import IMAGENET_LABELS, sample_photo_paths
    from unioncam.data.shards import Sample, write_shards

    photos = []
    for name, label in IMAGENET_LABELS.items():  # those this machine's scikit-image and matplotlib ship
        with contextlib.suppress(FileNotFoundError):
            photos.append((name, Image.open(sample_photo_paths([name])[name]).convert("RGB"), label))
    if not photos:
        raise FileNotFoundError("none of the sample photos is installed (scikit-image, matplotlib)")
    rng = random.Random(seed)

    def samples() -> Iterator[Sample]:
        for i in range(shards * per_shard):
            name, img, label = photos[i % len(photos)]
            k = i // len(photos)
            variant = img
            if k:
                w, h = img.size
                cw, ch = max(32, int(w * rng.uniform(0.55, 1.0))), max(32, int(h * rng.uniform(0.55, 1.0)))
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                variant = img.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            short = rng.randint(160, 320) if k else 256
            scale = short / min(variant.size)
            variant = variant.resize((max(1, round(variant.size[0] * scale)), max(1, round(variant.size[1] * scale))),
                                     Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            variant.save(buf, "JPEG", quality=90)
            yield Sample(f"{name}_v{k:03d}", buf.getvalue(), "jpg", label, {"source": name, "variation": k})

    info = {"dataset": "gpu-check", "source": "the sample photos, cropped/flipped/resized (benchmarks/gpu_check.py)"}
    manifest = write_shards(samples(), folder, PREFIX, per_shard, info)
    return [folder / s["name"] for s in manifest["shards"]]


def write_vgg16_weights(path: Path, seed: int = 0) -> Path:
    """A torchvision VGG16 state dict with seeded random weights: VGG16's cost without a download."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = vgg16()
    torch.save(net.state_dict(), path)
    return path


def decoded(paths: list[Path], size: tuple[int, int]) -> list[dict[str, Any]]:
    """The shards' samples as the worker decodes them (:func:`unioncam.data.shards.iter_samples`)."""
    from unioncam.data.shards import iter_samples

    records = list(iter_samples([str(p) for p in paths], size))
    bad = [r for r in records if "error" in r]
    if bad:
        raise RuntimeError(f"{len(bad)} samples do not decode, e.g. {bad[0]['key']}: {bad[0]['error']}")
    return records


# -- the check ---------------------------------------------------------------------------------------
@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    out: Path
    work: Path
    log: Log
    start: float
    deadline: float
    rows: list[Row] = field(default_factory=list)
    methods: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    weights: Path | None = None
    failed: bool = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.log(f"  {row.check}: {row.cell()}{f' ({row.note})' if row.note else ''} [{row.status}]")

    def error(self, part: str, exc: BaseException) -> None:
        self.failed = True
        self.log(traceback.format_exc().rstrip())
        self.add(Row(f"{part}: failed", note=f"{type(exc).__name__}: {exc}"[:300], status="error"))

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def data(self) -> tuple[list[Path], Path | None]:
        """The shards and the weights file, written once."""
        if not self.shards:
            start = time.perf_counter()
            self.shards = write_photo_shards(self.work / "shards", self.args.shards, self.args.per_shard)
            if self.args.model == "vgg16":
                self.weights = write_vgg16_weights(self.work / "vgg16-seed0.pth")
            self.log(f"wrote {len(self.shards)} shards × {self.args.per_shard} photos"
                     f"{' and seeded VGG16 weights' if self.weights else ''} in {time.perf_counter() - start:.1f} s")
        return self.shards, self.weights


def run_tests(c: Check) -> None:
    """Part 1: ``pytest -m cuda`` over the test files that hold CUDA-marked tests."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if re.search(r"pytest\.mark\.cuda\b", p.read_text(encoding="utf-8")))
    if not files:
        c.add(Row("CUDA tests", note="no test is marked cuda", status="error"))
        c.failed = True
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    c.log(f"$ {' '.join(cmd)}")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(60.0, min(300.0, c.left())))
    (c.out / "pytest.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k.rstrip("s"): int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                                           tail)}
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0)
    note = f"{tail.strip('= ')}; {len(files)} files; exit {done.returncode}; {time.perf_counter() - start:.0f} s"
    if failed or done.returncode not in (0, 5) or (c.gpu and not passed):
        c.failed = c.failed or bool(failed) or done.returncode not in (0, 5)
        c.add(Row("CUDA tests (pytest -m cuda)", passed, "passed", note, "all pass", "error" if failed else
                  "below target"))
        c.log(done.stdout[-3000:] + done.stderr[-2000:])
    else:
        c.add(Row("CUDA tests (pytest -m cuda)", passed, "passed", note, "all pass",
                  "ok" if c.gpu else "n/a"))


WORKER_LINE = re.compile(
    r"worker (?P<pid>\d+) on (?P<device>\S+): (?P<precision>\w+), batch (?P<batch>\d+), "
    r"(?P<ipb>\d+) image\(s\) per call"
    r"(?:, GPU plan: (?P<per_input>[\d.]+) MiB per masked input within (?P<budget>[\d.]+) GiB)?"
    r"; ready in (?P<ready>[\d.]+) s(?:; compiled and warmed up in (?P<warmup>[\d.]+) s \((?P<graphs>\d+) graphs\))?")


def run_job(c: Check) -> None:
    """Part 2a: the evaluation job with default flags (UnionCAM + AD/AI, 1 worker)."""
    shards, weights = c.data()
    run_dir = c.work / "run"
    cmd = [sys.executable, "jobs/eval_imagenet.py", "--shards", str(c.work / "shards" / f"{PREFIX}-*.tar"),
           "--out", str(run_dir), "--model", c.args.model, "--methods", JOB_METHOD, "--metrics", "ad,ai",
           "--workers", "1"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if c.args.address:
        cmd += ["--address", c.args.address]
    if not c.gpu:
        cmd += ["--gpus-per-worker", "0", "--cpus-per-worker", str(c.args.cpus_per_worker or 1)]
    elif c.args.cpus_per_worker:
        cmd += ["--cpus-per-worker", str(c.args.cpus_per_worker)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if not c.args.address:
        env.pop("RAY_ADDRESS", None)
    c.log(f"$ {' '.join(cmd)}")
    log_path = c.out / "job.log"
    memory = GPUMemory(c.device)
    start = time.perf_counter()
    with memory.sampling() as mem, log_path.open("w", encoding="utf-8") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(30.0, c.left() - 60))
        except subprocess.TimeoutExpired:
            c.log("the job ran out of the time budget: interrupting it (SIGINT), then killing it")
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    wall = time.perf_counter() - start
    text = log_path.read_text(encoding="utf-8", errors="replace")
    with contextlib.suppress(OSError):
        shutil.copy2(run_dir / "manifest.json", c.out / "manifest.json")
    c.log("job log, last lines:\n  " + "\n  ".join(text.strip().splitlines()[-12:]))

    from unioncam.service.rundir import load_manifest

    manifest = load_manifest(str(run_dir))
    entries = [e for e in manifest["shards"].values() if e.get("status") == "done"]
    images = sum(int(e.get("images", 0)) for e in entries)
    seconds = sum(float(e.get("seconds", 0.0)) for e in entries)
    errors = sum(int(e.get("errors", 0)) for e in entries)
    want = c.args.shards * c.args.per_shard
    ok = rc == 0 and len(entries) == len(shards) and images == want and errors == 0
    c.add(Row("job: shards done", len(entries), "shards",
              f"{images} images, {errors} error rows, exit {rc}, {wall:.0f} s wall; {c.args.model}, UnionCAM + AD/AI, "
              "1 worker, default flags", f"{len(shards)} shards, {want} images, 0 errors", status(ok)))
    if not ok:
        c.failed = True
    in_shard = images / seconds if seconds > 0 else float("nan")
    c.settings["job_img_s"] = in_shard
    c.add(Row("job: in-shard throughput", in_shard, "img/s",
              f"Σ images / Σ shard seconds (manifest; decode, explain, score, write) over {len(entries)} shards",
              "≥ 20 img/s per H100" if c.gpu else "", status(in_shard >= 20 if c.gpu else None)))
    c.add(Row("job: end to end", images / wall if wall > 0 else None, "img/s",
              f"{images} images in {wall:.1f} s: Ray's start, the worker's start, compile, shards, report"))

    found = WORKER_LINE.search(text)
    workers = manifest.get("workers") or []
    threads = int(workers[0].get("threads", 0)) if workers else 0
    if found:
        g = found.groupdict()
        c.settings.update(precision=g["precision"], batch=int(g["batch"]), images_per_batch=int(g["ipb"]),
                          compile=g["warmup"] is not None, threads=threads, source="the job's worker")
        plan = (f"; GPU plan {g['per_input']} MiB per masked input within {g['budget']} GiB" if g["per_input"] else "")
        c.add(Row("job: worker settings", int(g["batch"]), "masked inputs per forward",
                  f"{g['precision']}, {g['ipb']} image(s) per call, compile {'on' if g['warmup'] else 'off'}, "
                  f"{threads} threads{plan}; worker ready in {g['ready']} s"))
        recompiles = len(re.findall(r"recompiled during", text))
        if g["warmup"] is not None:
            c.add(Row("job: compile + warm-up", float(g["warmup"]), "s",
                      "torch.compile at one padded batch shape, methods' and metrics' precisions, before the first "
                      "shard"))
            c.add(Row("job: graphs compiled", int(g["graphs"]), "graphs",
                      f"after the warm-up; {recompiles} recompile warning(s) during the shards", "no recompile",
                      status(recompiles == 0)))
        else:
            c.add(Row("job: compile + warm-up", None, note="compile off (the CPU default)", status="n/a"))
    else:
        c.add(Row("job: worker settings", note="the worker's start line is not in the job's log", status="error"))
        c.failed = True
    if c.gpu:
        pids = {int(w["pid"]) for w in workers if "pid" in w}
        per_worker = max((mem["per_pid"].get(p, 0) for p in pids), default=0)
        how = "NVML, the worker process"
        if not per_worker:
            per_worker, how = mem["peak"] - mem["baseline"], "NVML, the device's use above its use before the job"
        if mem["why"]:
            c.add(Row("job: peak GPU memory (worker)", None, note=f"not measured: {mem['why']}", status="n/a"))
        else:
            c.add(Row("job: peak GPU memory (worker)", per_worker / GIB, "GiB",
                      f"{how} (its CUDA context included), sampled every 0.2 s",
                      "≤ 4 GiB per worker", status(per_worker <= 4 * GIB)))


def in_process_settings(c: Check, model: torch.nn.Module, size: tuple[int, int]) -> dict[str, Any]:
    """The job's resolved settings (from its worker), else those a worker would resolve here."""
    if "batch" in c.settings:
        return c.settings
    from unioncam.engine import default_batch_size, gpu_plan
    from unioncam.ops import resolve_precision

    precision = resolve_precision("auto", c.device)
    if c.gpu:
        from unioncam.engine import DEFAULT_GPU_MEMORY_GIB

        plan = gpu_plan(model, size, precision, DEFAULT_GPU_MEMORY_GIB)
        batch, ipb = plan.batch_size, plan.images_per_batch
    else:
        batch, ipb = default_batch_size(c.device), 1
    c.settings.update(precision=precision, batch=batch, images_per_batch=ipb, compile=c.gpu,
                      threads=0 if c.gpu else (c.args.cpus_per_worker or 1), source="resolved here (no job ran)")
    return c.settings


def run_in_process(c: Check) -> None:
    """Part 2b: the library in this process on the job's images with the job's settings."""
    import unioncam
    from unioncam.engine import predict
    from unioncam.evaluation import confidence
    from unioncam.models import compiled_graphs
    from unioncam.ops import autocast

    shards, weights = c.data()
    loaded = unioncam.load(c.args.model, weights, channels_last=True, fuse=True)  # the job's defaults
    net = loaded.model.to(c.device)
    s = in_process_settings(c, net, loaded.input_size)
    saved_threads = torch.get_num_threads()
    if not c.gpu and s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    try:
        records = decoded(shards, loaded.input_size)
        warmup, graphs0 = 0.0, compiled_graphs()
        if s["compile"]:  # as the worker: one padded shape, warmed up for both precisions before the first image
            net.compile_inference(pad_to=s["batch"])
            start = time.perf_counter()
            x0 = torch.zeros((1, 3, *loaded.input_size), device=c.device)
            for precision in dict.fromkeys((s["precision"], "fp32")):
                with torch.inference_mode(), autocast(c.device, precision):
                    net(x0)
            sync(c.device)
            warmup = time.perf_counter() - start
        graphs = compiled_graphs() - graphs0
        batches: list[list[dict[str, Any]]] = []
        for shard in sorted({r["shard"] for r in records}):  # the worker's batches: within a shard
            mine = [r for r in records if r["shard"] == shard]
            batches += [mine[i:i + s["images_per_batch"]] for i in range(0, len(mine), s["images_per_batch"])]
        total, cut = len(records), ""
        job_rate = c.settings.get("job_img_s")
        if job_rate and math.isfinite(job_rate) and total / job_rate * 1.2 > c.left() - 60:  # keep to the budget
            keep, kept = max(1, int((c.left() - 60) * job_rate / 1.2)), []
            for b in batches:
                if sum(len(k) for k in kept) >= keep:
                    break
                kept.append(b)
            batches = kept
            cut = f" (the first {sum(len(b) for b in batches)} of {total}: time budget)"
        if c.gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(c.device)

        def work() -> int:
            n = 0
            for batch in batches:
                x = torch.stack([r["image"] for r in batch]).to(c.device, non_blocking=True)
                targets = predict(net, x)[0]
                res = unioncam.explain(net, x, JOB_METHOD, targets=targets, batch_size=s["batch"],
                                       precision=s["precision"])
                y, o = confidence(net, x, res.maps.float(), targets, s["batch"], "fp32")
                y.tolist(), o.tolist()  # the worker's rows read them: a host synchronization
                n += x.shape[0]
            return n

        seconds, n = timed(work, c.device)
    finally:
        torch.set_num_threads(saved_threads)
    rate = n / seconds
    c.add(Row("library in-process: throughput", rate, "img/s",
              f"unioncam.explain + confidence on the job's {n} images{cut}, {s['precision']}, batch {s['batch']}, "
              f"{s['images_per_batch']} image(s) per call, compile {'on' if s['compile'] else 'off'}"
              f"{f', warm-up {warmup:.1f} s, {graphs} graphs' if s['compile'] else ''} (settings: {s['source']})"))
    if "job_img_s" in c.settings:
        ratio = c.settings["job_img_s"] / rate
        c.add(Row("job / in-process", ratio, "", "in-shard img/s of the job over the library's img/s",
                  "≥ 0.95", status(ratio >= 0.95 if c.gpu else None)))
    if c.gpu:
        c.add(Row("library in-process: peak GPU memory", torch.cuda.max_memory_reserved(c.device) / GIB, "GiB",
                  f"torch's reserved peak ({torch.cuda.max_memory_allocated(c.device) / GIB:.2f} GiB allocated)"))


def metric_runners(model: torch.nn.Module, size: tuple[int, int], batch: int,
                   steps: int) -> dict[str, Callable[[Any], list[Any]]]:
    """Every registered metric once (metrics that share their columns, Average Drop and Increase, as
    one), as ``{label: score(MapBatch) -> per map: {column: value} or an error text}``, fp32."""
    from unioncam.evaluation import METRICS, MetricContext, metric_classes, scorers
    from unioncam.evaluation.protocols import get_protocol

    protocol = get_protocol("reference")
    context = MetricContext(model=model, size=size, batch_size=batch, precision="fp32", protocol=protocol,
                            insdel_steps=steps)
    out: dict[str, Callable[[Any], list[Any]]] = {}
    for cls in scorers(METRICS.names()):
        if cls.unavailable(protocol):
            continue
        names = [m.name for m in metric_classes() if tuple(m.columns) == tuple(cls.columns)]
        label = "+".join(names) + (f" ({steps} steps)" if cls.name == "insdel" else "")
        out[label] = cls(context).score
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Pearson's r of each pair of maps (``B×H×W``), in float64; two constant maps agree (1) when equal."""
    x, y = a.double().flatten(1), b.double().flatten(1)
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    den = (x.square().sum(1) * y.square().sum(1)).sqrt()
    same = (a.double() - b.double()).flatten(1).abs().amax(1) <= 1e-6
    r = (x * y).sum(1) / den.clamp_min(1e-300)
    return [float(1.0 if d == 0 and s else 0.0 if d == 0 else v) for v, d, s in
            zip(r.tolist(), den.tolist(), same.tolist(), strict=True)]


def ad_ai(values: list[Any]) -> tuple[float, float]:
    """Average Drop and Increase (REFERENCE.md: relative drop) in percent from ``{y, o}`` per map."""
    pairs = [(v["y"], v["o"]) for v in values if isinstance(v, dict) and "y" in v]
    if not pairs:
        return float("nan"), float("nan")
    drop = sum(100 * max(0.0, y - o) / y for y, o in pairs) / len(pairs)
    increase = sum(100.0 * (y < o) for y, o in pairs) / len(pairs)
    return drop, increase


def run_methods(c: Check) -> None:
    """Part 3: every method, metric and the sanity cascade on the device.

    Each method is first run on one image (its warm-up, timed); its further work is then sized to
    ``--unit-cap-s``: the images it explains (and the metrics score), at most ``--images``, and the
    sanity cascade on one image, skipped (with its estimate) when it would take longer."""
    import unioncam
    from unioncam.engine import masked_inputs, predict
    from unioncam.evaluation import MapBatch
    from unioncam.evaluation.sanity import cascade_steps, sanity_check
    from unioncam.methods import applicable

    shards, weights = c.data()
    loaded = unioncam.load(c.args.model, weights, channels_last=True, input_size=c.args.image_size)
    net = loaded.model.to(c.device)
    size = loaded.input_size
    records = decoded(shards, size)[: c.args.images]
    x = torch.stack([r["image"] for r in records]).to(c.device)
    keys = [r["key"] for r in records]
    h, w = size
    centre = [[[w / 4, h / 4, 3 * w / 4, 3 * h / 4]] for _ in records]  # the photos have no boxes: EPG's path only
    s = in_process_settings(c, net, size)
    batch = int(s["batch"])
    targets = predict(net, x)[0]
    runners = metric_runners(net, size, batch, c.args.insdel_steps)
    steps = len(cascade_steps(net, None))
    sanity_label = f"sanity ({steps} steps, 1 image)"
    c.settings.update(metric_labels=list(runners), sanity_label=sanity_label)
    names = unioncam.METHODS.names()
    _, left_out = applicable(names, net, loaded.target_layer, size, optional=names)  # LeGrad on a CNN: not applicable
    cap = c.args.unit_cap_s
    c.log(f"methods: {', '.join(names)}; metrics: {', '.join(runners)}; sanity: {steps} cascade steps; up to "
          f"{len(records)} images on {c.device}, batch {batch}, precision auto; {cap:g} s per method and part")
    for name in names:
        entry: dict[str, Any] = {"method": name, "images": 0, "seconds": {}, "values": {}, "notes": []}
        c.methods.append(entry)
        if name in left_out:
            entry["error"] = f"skipped: not applicable ({left_out[name]})"
            continue
        if c.left() < 30:
            entry["error"] = "skipped: time budget"
            continue
        try:
            def explain(xs: torch.Tensor, ts: torch.Tensor, name: str = name) -> Any:
                return unioncam.explain(net, xs, name, targets=ts, batch_size=batch)

            first, _ = timed(lambda explain=explain: explain(x[:1], targets[:1]), c.device)  # warm-up, timed
            n = max(1, min(len(records), int(cap / max(first, 1e-9))))
            before = masked_inputs()
            t, res = timed(lambda explain=explain, n=n: explain(x[:n], targets[:n]), c.device)
            entry.update(images=n, targets=targets[:n].tolist(), forwards=(masked_inputs() - before) / n)
            if n < len(records):
                entry["notes"].append(f"{n} of {len(records)} images (one took {first:.1f} s)")
            maps = res.maps.float()
            entry["seconds"]["explain"] = t / n
            entry["maps"] = maps.cpu()
            every = name == names[0] or c.args.metrics_for == "all"
            for label, score in runners.items():
                if c.left() < 20 or not (every or label.startswith("ad+")):
                    continue
                b = MapBatch(images=x[:n], maps=maps, targets=targets[:n], keys=keys[:n], boxes=centre[:n])
                t, values = timed(lambda score=score, b=b: score(b), c.device)
                entry["seconds"][label] = t / n
                entry["values"][label] = values
            estimate = entry["seconds"]["explain"] * (steps + 1)  # step 0 and after each re-initialization
            if every and estimate > min(cap, c.left() - 30):
                entry["notes"].append(f"sanity skipped: estimated {estimate:.0f} s")
            elif every:
                t, _ = timed(lambda name=name: sanity_check(net, [name], x[:1], targets[:1], seed=0), c.device)
                entry["seconds"][sanity_label] = t
        except Exception as exc:
            c.log(traceback.format_exc().rstrip())
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            c.failed = True
        if c.gpu:
            torch.cuda.empty_cache()


def cpu_speed_ratio(c: Check, cpu_net: torch.nn.Module, size: tuple[int, int]) -> float:
    """How many times longer a masked forward takes on the CPU in fp32 than on the device at the
    methods' precision (a batch of 8, the second run timed); 1 on the CPU itself."""
    if not c.gpu:
        return 1.0
    import unioncam
    from unioncam.ops import autocast, resolve_precision

    probe = torch.rand(8, 3, *size)
    dev = unioncam.load(c.args.model, c.weights, channels_last=True, input_size=c.args.image_size).model.to(c.device)
    xd = probe.to(c.device)
    precision = resolve_precision("auto", c.device)

    def on_device() -> None:
        with torch.inference_mode(), autocast(c.device, precision):
            dev(xd)

    def on_cpu() -> None:
        with torch.inference_mode(), autocast(torch.device("cpu"), "fp32"):
            cpu_net(probe)

    for fn, where in ((on_device, c.device), (on_cpu, torch.device("cpu"))):
        fn()
        sync(where)
    t_dev, _ = timed(on_device, c.device)
    t_cpu, _ = timed(on_cpu, torch.device("cpu"))
    return t_cpu / max(t_dev, 1e-9)


def run_cpu_reference(c: Check) -> None:
    """Part 3b: the same methods on the CPU in IEEE fp32 over the first ``--compare-images`` of the
    images each explained on the device, the costliest first (the score-based methods, whose masked
    forwards run in fp16 on GPUs, matter most); a method whose estimate (its device time × the CPU's
    measured slowness, and its masked forwards × the CPU's time per forward) exceeds ``--cpu-cap-s``
    or the budget left is compared on one image, or skipped with its estimate."""
    import unioncam
    from unioncam.evaluation import confidence
    from unioncam.ops import autocast

    shards, weights = c.data()
    loaded = unioncam.load(c.args.model, weights, input_size=c.args.image_size)
    net = loaded.model  # on the CPU, fp32
    records = decoded(shards, loaded.input_size)[: c.args.compare_images]
    x = torch.stack([r["image"] for r in records])
    ratio = cpu_speed_ratio(c, net, loaded.input_size)
    with torch.inference_mode(), autocast(torch.device("cpu"), "fp32"):
        net(x[:1].repeat(4, 1, 1, 1))
        per_input = timed(lambda: net(x[:1].repeat(4, 1, 1, 1)), torch.device("cpu"))[0] / 4
    c.settings.update(cpu_over_device=ratio, cpu_seconds_per_forward=per_input)
    c.log(f"CPU: {per_input:.4f} s per forward (fp32, batch 4), {ratio:.1f}× the device's at its precision")
    for entry in sorted(c.methods, key=lambda e: -(e["seconds"].get("explain") or 0.0)):
        if "maps" not in entry:
            continue
        estimate, per_image = 0.0, max(entry["seconds"]["explain"] * ratio, (entry.get("forwards", 0) + 3) * per_input)
        for n in range(min(len(records), entry["images"]), 0, -1):
            estimate = n * per_image
            if estimate <= min(c.args.cpu_cap_s, c.left() - 30):
                break
        else:
            entry["cpu_error"] = f"skipped: estimated {estimate:.0f} s on the CPU"
            continue
        try:
            targets = torch.as_tensor(entry["targets"][:n])  # the device run's: its predicted classes
            dev_maps = entry["maps"][:n]
            ad_label = next((k for k in entry["values"] if k.split(" ")[0].split("+")[0] == "ad"), None)
            dev_values = entry["values"].get(ad_label, [])[:n] if ad_label else []
            t, res = timed(lambda entry=entry, targets=targets, n=n: unioncam.explain(
                net, x[:n], entry["method"], targets=targets, precision="fp32"), torch.device("cpu"))
            maps = res.maps.float()
            y, o = confidence(net, x[:n], maps, targets, None, "fp32")
            cpu_ad, cpu_ai = ad_ai([{"y": a, "o": b} for a, b in zip(y.tolist(), o.tolist(), strict=True)])
            dev_ad, dev_ai = ad_ai(dev_values)
            r = pearson(dev_maps, maps)
            entry["cpu"] = {"images": n, "explain_s": t / n, "estimate_s": estimate, "pearson_min": min(r),
                            "pearson_mean": sum(r) / n, "max_abs_diff": float((dev_maps - maps).abs().max()),
                            "ad_device": dev_ad, "ad_cpu": cpu_ad, "ai_device": dev_ai, "ai_cpu": cpu_ai,
                            "d_ad": dev_ad - cpu_ad, "d_ai": dev_ai - cpu_ai}
        except Exception as exc:
            c.log(traceback.format_exc().rstrip())
            entry["cpu_error"] = f"{type(exc).__name__}: {exc}"[:300]
            c.failed = True


#: methods whose map's sign is an SVD's (pytorch-grad-cam's EigenCAM convention, which unioncam keeps)
SVD_SIGN = frozenset({"eigencam", "eigengradcam"})


def method_rows(c: Check) -> list[Row]:
    """The summary's rows of part 3: per method its agreement with the CPU, per metric its cost."""
    target = "Pearson ≥ 0.999 (fp16 masked forwards)" if c.gpu else "Pearson ≥ 0.999"
    rows = []
    for e in c.methods:
        if "error" in e:
            rows.append(Row(f"method {e['method']}", note=e["error"],
                            status="skipped" if e["error"].startswith("skipped") else "error"))
            continue
        cpu = e.get("cpu")
        cost = "; ".join([f"{e['seconds'].get('explain', float('nan')):.4g} s/img on {c.device}", *e["notes"]])
        if cpu is None:
            why = e.get("cpu_error", "skipped: no CPU reference ran (--skip cpu or the time budget)")
            rows.append(Row(f"method {e['method']} vs CPU fp32", None, note=f"{cost}; {why}",
                            status="skipped" if why.startswith("skipped") else "error"))
            continue
        sign = e["method"] in SVD_SIGN  # the reference's sign: LAPACK's, which tiny differences can flip
        rows.append(Row(f"method {e['method']} vs CPU fp32", cpu["pearson_min"], "Pearson",
                        f"{cost}; min over {cpu['images']} image(s) (mean {cpu['pearson_mean']:.5f}); ΔAD "
                        f"{cpu['d_ad']:+.2f}, ΔAI {cpu['d_ai']:+.1f} points; max |Δmap| {cpu['max_abs_diff']:.2g}"
                        + ("; the first principal component's sign is LAPACK's SVD's, as pytorch-grad-cam's: it may "
                           "flip between memory layouts and devices, so this row is not held to the target" if sign
                           else ""), target, "info" if sign else status(cpu["pearson_min"] >= 0.999)))
    for label in [*c.settings.get("metric_labels", []), c.settings.get("sanity_label", "sanity")]:
        per = [e["seconds"][label] for e in c.methods if e["seconds"].get(label) is not None]
        if per:
            how = "each method again on every randomized copy" if label.startswith("sanity") else \
                "fp32 metric forwards"
            rows.append(Row(f"metric {label}", sum(per) / len(per), "s/img",
                            f"mean over {len(per)} method(s)' maps on {c.device}; {how}; per method: the methods "
                            "table"))
    return rows


def method_table(c: Check) -> str:
    labels = [*c.settings.get("metric_labels", []), c.settings.get("sanity_label", "sanity")]
    header = ["method", "images", "explain s/img", *[f"{k} s/img" for k in labels], "CPU fp32 explain s/img",
              "Pearson min (mean)", "ΔAD", "ΔAI", "max abs Δmap", "notes"]
    rows = []

    def num(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    for e in c.methods:
        cpu = e.get("cpu") or {}
        notes = "; ".join([*e.get("notes", []), *([e["error"]] if "error" in e else []),
                           *([e["cpu_error"]] if "cpu_error" in e else [])])
        rows.append([e["method"], str(e["images"]), num(e["seconds"].get("explain")),
                     *[num(e["seconds"].get(k)) for k in labels], num(cpu.get("explain_s")),
                     f"{cpu['pearson_min']:.5f} ({cpu['pearson_mean']:.5f})" if cpu else "-",
                     f"{cpu['d_ad']:+.2f}" if cpu else "-", f"{cpu['d_ai']:+.1f}" if cpu else "-",
                     num(cpu.get("max_abs_diff")), notes or "-"])
    return md_table(header, rows)


def finish(c: Check, header: str, final: bool) -> None:
    """Write the summary as it stands (after every part, so a run cut short leaves its table); the
    final one is printed too."""
    rows = [*c.rows, *method_rows(c)]
    if final:
        rows.append(Row("gpu_check wall time", time.monotonic() - c.start, "s", f"budget {c.args.budget_s:.0f} s"))
    summary = md_table(["check", "value", "target", "status"],
                       [[r.check, r.cell() + (f" ({r.note})" if r.note else ""), r.target or "-", r.status]
                        for r in rows])
    details = method_table(c) if c.methods else ""
    text = f"# GPU check\n\n{header}\n\n## Summary\n\n{summary}\n"
    if details:
        text += f"\n## Methods and metrics (seconds per image; agreement with the CPU in fp32)\n\n{details}\n"
    if not final:
        text += "\n(unfinished: written after each part)\n"
    else:
        c.log("\n" + text)
    (c.out / "summary.md").write_text(text, encoding="utf-8")
    methods = [{k: v for k, v in e.items() if k not in ("maps", "values")} for e in c.methods]
    data = {"header": header, "device": str(c.device), "final": final, "rows": [asdict(r) for r in rows],
            "methods": methods, "settings": {k: v for k, v in c.settings.items() if k != "job_img_s"},
            "failed": c.failed}
    (c.out / "summary.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda[:N] or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="the dry run: tiny_cnn, 2 shards × 2 photos; methods on 1 image of 64×64, "
                        "insertion/deletion at 16 steps")
    p.add_argument("--model", default=None, help="vgg16 (default; seeded random weights) or tiny_cnn (--quick)")
    p.add_argument("--shards", type=int, default=None, help="shards for the job (default 8; --quick 2)")
    p.add_argument("--per-shard", type=int, default=None, help="photos per shard (default 64; --quick 2)")
    p.add_argument("--images", type=int, default=None, help="images per method in part 3 (default 4; --quick 1)")
    p.add_argument("--compare-images", type=int, default=None,
                   help="of those, compared with the CPU in fp32 (default 2; --quick 1)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size in part 3 (default: the model's, 224; --quick 64)")
    p.add_argument("--insdel-steps", type=int, default=None, help="insertion/deletion steps (default 224; --quick 16)")
    p.add_argument("--metrics-for", choices=("all", "first"), default=None,
                   help="whose maps the metrics other than AD/AI and the sanity cascade score: every method's "
                        "(default) or the first method's (--quick)")
    p.add_argument("--unit-cap-s", type=float, default=None,
                   help="seconds a method's explaining, or its sanity cascade, may take on the device: its images "
                        "are reduced to fit, its cascade skipped (default 30; --quick 20)")
    p.add_argument("--cpu-cap-s", type=float, default=None,
                   help="estimated seconds a method's CPU fp32 reference may take: one image, else skipped "
                        "(default 120; --quick 30)")
    p.add_argument("--address", default=None, help="the Ray cluster for the job (default: a fresh local Ray)")
    p.add_argument("--cpus-per-worker", type=int, default=None, help="the job's --cpus-per-worker (cpu default: 1)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: $OUT when set, else out/gpu-check/")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for everything; a part that would run past it is shortened or skipped, so the run "
                        "ends within about a minute of it (default 450: the device tool's 600 s call leaves room for "
                        "the install; --quick 300)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    p.add_argument("--keep", action="store_true", help="keep the work folder (shards, weights, run directory)")
    args = p.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("tiny_cnn" if quick else "vgg16")
    args.shards = args.shards or (2 if quick else 8)
    args.per_shard = args.per_shard or (2 if quick else 64)
    args.images = args.images or (1 if quick else 4)
    args.compare_images = min(args.compare_images or (1 if quick else 2), args.images)
    args.image_size = args.image_size or (64 if quick else None)
    args.insdel_steps = args.insdel_steps or (16 if quick else 224)
    args.metrics_for = args.metrics_for or ("first" if quick else "all")
    args.budget_s = args.budget_s or (300.0 if quick else 450.0)
    args.unit_cap_s = args.unit_cap_s or (20.0 if quick else 30.0)
    args.cpu_cap_s = args.cpu_cap_s or (30.0 if quick else 120.0)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(PARTS):
        p.error(f"--skip: unknown parts {sorted(args.skip - set(PARTS))}; valid: {', '.join(PARTS)}")
    if min(args.shards, args.per_shard, args.images, args.compare_images, args.insdel_steps,
           args.image_size or 1) < 1:
        p.error("--shards, --per-shard, --images, --compare-images, --image-size and --insdel-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: --device cuda but CUDA is not available (use --device cpu --quick for the dry run)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    out = args.out_dir or Path(os.environ.get("OUT") or REPO / "out" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="unioncam-gpu-check-"))
    log = Log(out / "gpu_check.log")
    start = time.monotonic()
    c = Check(args, device, out, work, log, start, start + args.budget_s)
    what = (f"{args.model}{' (seeded random weights)' if args.model == 'vgg16' else ''}; job: {args.shards} shards × "
            f"{args.per_shard} photos, UnionCAM + AD/AI, 1 worker, default flags; methods: {args.images} image(s), "
            f"CPU fp32 reference on {args.compare_images}{f', at {args.image_size} px' if args.image_size else ''}; "
            f"insertion/deletion {args.insdel_steps} steps")
    header = f"{machine_line(device)}. {what}."
    log(f"# gpu_check: {header}")
    parts: list[tuple[str, Callable[[Check], None]]] = [
        ("tests", run_tests), ("job", run_job), ("inprocess", run_in_process), ("methods", run_methods),
        ("cpu", run_cpu_reference)]
    try:
        for part, fn in parts:
            if part in args.skip:
                continue
            if c.left() < 20:
                c.add(Row(f"{part}: skipped", note="time budget", status="skipped"))
                continue
            log(f"\n## {part} ({c.left():.0f} s of the budget left)")
            t0 = time.monotonic()
            try:
                fn(c)
            except Exception as exc:
                c.error(part, exc)
            log(f"({part}: {time.monotonic() - t0:.1f} s)")
            finish(c, header, final=False)
        finish(c, header, final=True)
    finally:
        log.close()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
