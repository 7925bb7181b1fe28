"""Shared helpers for the benchmarks: real photos, timing, the ``--device`` option, the machine line."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from unioncam.data.sample import sample_photo_paths
from unioncam.viz import load_image

PHOTOS = ("chelsea", "coffee", "motorcycle", "grace_hopper")


def photos(n: int, size: tuple[int, int]) -> torch.Tensor:
    """The first ``n`` of :data:`PHOTOS` (real photos shipped with scikit-image / matplotlib)."""
    paths = sample_photo_paths(list(PHOTOS[:n]))
    return torch.stack([load_image(p, size) for p in paths.values()])


def random_vgg16_weights() -> Path:
    """A seeded random VGG16 state dict in the temp dir (written once): VGG16's structure without a
    download, loaded through the real ``unioncam.load("vgg16", weights=...)`` path."""
    path = Path(tempfile.gettempdir()) / "unioncam-bench-vgg16-seed0.pth"
    if not path.is_file():
        from torchvision.models import vgg16

        torch.manual_seed(0)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(vgg16().state_dict(), tmp)
        os.replace(tmp, path)
    return path


def default_device() -> str:
    """``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' shared ``--device`` option (default: :func:`default_device`)."""
    parser.add_argument("--device", default=default_device(),
                        help="where the model and its inputs run: cpu, cuda or cuda:N "
                             "(default: cuda when available, else cpu)")


def device_of(spec: str) -> torch.device:
    """``--device spec`` as a device; a bad spec or CUDA without CUDA exits with a one-line error
    (code 2), not a traceback."""
    def fail(why: str) -> NoReturn:
        print(f"{Path(sys.argv[0]).name}: error: --device {spec}: {why}", file=sys.stderr)
        raise SystemExit(2)

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else "not a device")
    if device.type not in ("cpu", "cuda"):
        fail("the benchmarks run on cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device: torch.device | str | None) -> None:
    """Wait for ``device``'s queued kernels (CUDA only), so a timer read after it counts them."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """Wall seconds of one call and its result; on a CUDA ``device`` the queue is drained
    (``torch.cuda.synchronize``) before the timer starts and before it is read."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine(device: torch.device | str = "cpu") -> str:
    """The header line's machine part: date, CPU, the device the benchmark runs on and the GPU's
    name (``torch.cuda.get_device_name``), torch (and CUDA) version, threads."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"device {device} ({torch.cuda.get_device_name(device)}, {props.total_memory / 2**30:.0f} GiB, "
                 f"CUDA {torch.version.cuda})")
    else:
        gpu = f"GPU {torch.cuda.get_device_name(0)} not used" if torch.cuda.is_available() else "no GPU"
        where = f"device {device} ({gpu})"
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({cpu}), {where}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table (what docs/performance.md pastes)."""
    cells = [[str(c) for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *["| " + " | ".join(r) + " |" for r in cells]])
