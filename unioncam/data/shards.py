"""WebDataset shards: writing (``<prefix>-NNNNNN.tar`` + ``manifest.json``) and robust reading.

A sample is consecutive tar members sharing a key: ``<key>.jpg`` (the original bytes, never
re-encoded; ``.png`` etc. keep their extension), ``<key>.cls`` (the label as decimal text, when
known) and ``<key>.json`` (metadata: boxes, objects, source file). Keys have no dots.

Reading uses only :mod:`tarfile` and PIL: nothing is unpickled, and each failure (a corrupt
image, a missing label, a truncated tar) becomes an error record ``{"key", "shard", "error"}``
while everything before it is kept.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unioncam.models import sha256_file
from unioncam.viz import pil_to_tensor

MANIFEST = "manifest.json"
FORMAT = "unioncam-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "bmp", "webp", "tif", "tiff")


@dataclass
class Sample:
    """One sample to write: image bytes as found on disk, its label and metadata."""

    key: str
    image: bytes
    ext: str
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def clean_key(stem: str) -> str:
    """A WebDataset key: the file stem with dots (which split key from extension) replaced."""
    key = stem.replace(".", "_")
    if not key or "/" in key:
        raise ValueError(f"bad sample key {stem!r}")
    return key


def write_shards(samples: Iterable[Sample], out: str | os.PathLike[str], prefix: str, shard_size: int = 1000,
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``samples`` into ``out/<prefix>-NNNNNN.tar`` files of ``shard_size`` samples each,
    then ``out/manifest.json`` (counts, checksums, ``info``). Each tar is written under a temporary
    name and renamed into place. Returns the manifest."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    labelled = 0
    tar: tarfile.TarFile | None = None
    tmp = final = Path()

    def close() -> None:
        assert tar is not None
        tar.close()
        os.replace(tmp, final)
        shards[-1]["sha256"] = sha256_file(final)
        shards[-1]["bytes"] = final.stat().st_size

    for sample in samples:
        if sample.key in seen:
            raise ValueError(f"duplicate sample key {sample.key!r}")
        seen.add(sample.key)
        if tar is None or shards[-1]["count"] >= shard_size:
            if tar is not None:
                close()
            final = out / f"{prefix}-{len(shards):06d}.tar"
            tmp = final.with_suffix(".tar.tmp")
            tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
            shards.append({"name": final.name, "count": 0})
        members = {sample.ext: sample.image, "json": json.dumps(sample.meta, sort_keys=True).encode()}
        if sample.label is not None:
            members["cls"] = str(sample.label).encode()
            labelled += 1
        for ext, data in members.items():
            member = tarfile.TarInfo(f"{sample.key}.{ext}")
            member.size = len(data)
            member.mode = 0o644
            tar.addfile(member, io.BytesIO(data))
        shards[-1]["count"] += 1
    if tar is not None:
        close()
    manifest = {"format": FORMAT, "prefix": prefix, "count": len(seen), "labelled": labelled,
                "shard_size": shard_size, "shards": shards, **(info or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """A list of shard paths from a list, a glob (``*.tar``) or a brace pattern
    (``imagenet-{000000..000009}.tar``). Raises ``FileNotFoundError`` when nothing matches."""
    if not isinstance(shards, (str, os.PathLike)):
        return [os.fspath(s) for s in shards]
    pattern = os.fspath(shards)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.groups()
        names = [pattern[: match.start()] + str(i).zfill(len(lo)) + pattern[match.end():]
                 for i in range(int(lo), int(hi) + 1)]
        return [p for n in names for p in expand_shards(n)]
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    found = [f for f in found if os.path.isfile(f)]
    if not found:
        raise FileNotFoundError(f"no shard matches {pattern}")
    return found


class DamagedShardError(Exception):
    """A tar that ends or breaks mid-way; ``key`` is the sample being read (None if none)."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members with the same key, as ``(key, {ext: bytes})``.

    Raises:
        DamagedShardError: the archive is truncated or corrupt; complete samples before it were yielded.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    members = iter(tar)
    while True:
        try:
            member = next(members, None)
            if member is None:
                break
            if not member.isfile():
                continue
            k, _, ext = os.path.basename(member.name).partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DamagedShardError(key, f"{type(exc).__name__}: {exc}") from exc
        parts[ext.lower()] = data
    if key is not None:
        yield key, parts


def decode_sample(key: str, parts: dict[str, bytes], size: tuple[int, int]) -> dict[str, Any]:
    """Decode one sample's members: image resized to ``size`` (``3×H×W`` in ``[0, 1]``), label,
    and boxes rescaled to the resized image. Raises ``ValueError`` with the reason on failure."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise ValueError(f"no image member (have: {', '.join(sorted(parts)) or 'nothing'})")
    meta = json.loads(parts["json"]) if "json" in parts else {}
    try:
        with Image.open(io.BytesIO(parts[ext])) as img:
            img.load()
            width, height = img.size
            image = pil_to_tensor(img, size)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode {key}.{ext}: {type(exc).__name__}: {exc}") from exc
    if "cls" not in parts:
        raise ValueError(f"missing label ({key}.cls)")
    try:
        label = int(parts["cls"].decode().strip())
    except ValueError as exc:
        raise ValueError(f"bad label {parts['cls'][:20]!r}") from exc
    sx, sy = size[1] / width, size[0] / height
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in meta.get("boxes", [])]
    return {"key": key, "image": image, "label": label, "boxes": boxes, "meta": meta,
            "orig_size": (height, width)}


def iter_samples(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 size: tuple[int, int] = (224, 224)) -> Iterator[dict[str, Any]]:
    """Yield decoded samples (``key``, ``shard``, ``image``, ``label``, ``boxes``, ``meta``) or error
    records (``key``, ``shard``, ``error``) from WebDataset shards.

    ``boxes`` are ``[xmin, ymin, xmax, ymax]`` rescaled to the resized image (see
    :mod:`unioncam.metrics` for the convention). A truncated or unreadable tar yields every complete
    sample before the damage, then one error record for the sample it broke in (key
    ``"<shard>:damaged"`` when no sample had started).
    """
    for path in expand_shards(shards):
        name = os.path.basename(path)
        try:
            with tarfile.open(path, "r|") as tar:
                for key, parts in _group(tar):
                    try:
                        yield {"shard": name, **decode_sample(key, parts, size)}
                    except ValueError as exc:
                        yield {"key": key, "shard": name, "error": str(exc)}
        except DamagedShardError as exc:
            yield {"key": exc.key or f"{name}:damaged", "shard": name, "error": f"truncated or corrupt tar: {exc}"}
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield {"key": f"{name}:damaged", "shard": name, "error": f"unreadable tar: {exc}"}
