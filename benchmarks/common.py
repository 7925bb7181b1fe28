"""Shared helpers for the benchmarks: real photos, timing, the machine line."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table (what the README's Performance section pastes)."""
    cells = [[str(c) for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *["| " + " | ".join(r) + " |" for r in cells]])
