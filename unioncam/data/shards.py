"""WebDataset shards: writing (``<prefix>-NNNNNN.tar`` + ``manifest.json``) and robust reading.

A sample is consecutive tar members sharing a key: ``<key>.jpg`` (the original bytes, never
re-encoded; ``.png`` etc. keep their extension), ``<key>.cls`` (the label as decimal text, when
known) and ``<key>.json`` (metadata: boxes, objects, source file). Keys have no dots.

Reading uses only :mod:`tarfile` and PIL: nothing is unpickled, and each failure (a corrupt
image, a missing label, a truncated tar) becomes an error record ``{"key", "shard", "error"}``
while everything before it is kept.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import lzma
import math
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from unioncam import storage
from unioncam.viz import IMAGE_EXTENSIONS, IMAGE_FORMATS, check_pixels, pil_to_tensor

MANIFEST = "manifest.json"
FORMAT = "unioncam-shards/1"
T = TypeVar("T")
# what reading a damaged archive raises (gzip/bz2 report bad data as OSError): damage in the data,
# unlike storage.StorageError, which is an I/O failure and is never caught as damage
DATA_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_TAR_SUFFIX = re.compile(r"\.(tar(\.(gz|bz2|xz))?|tgz|tbz2?|txz)$", re.IGNORECASE)


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
    then ``out/manifest.json`` (counts, checksums, ``info``). ``out`` is a folder or a URI prefix
    (``s3://bucket/shards``). Each tar is built in a local temporary file and then renamed into
    place (locally) or uploaded in one write (object stores), as is the manifest, so a reader never
    sees half a shard. Returns the manifest."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out = os.fspath(out)
    if not storage.is_uri(out):
        if os.path.exists(storage.local_path(out)) and not os.path.isdir(storage.local_path(out)):
            raise ValueError(f"--out {out} is a file, not a folder")
        os.makedirs(storage.local_path(out), exist_ok=True)
    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    labelled = 0
    tar: tarfile.TarFile | None = None
    tmp = ""
    with tempfile.TemporaryDirectory(prefix="unioncam-shards-",
                                     dir=None if storage.is_uri(out) else storage.local_path(out)) as scratch:
        def close() -> None:
            assert tar is not None
            tar.close()
            shards[-1]["sha256"] = storage.sha256(tmp)
            shards[-1]["bytes"] = os.path.getsize(tmp)
            storage.put_file(tmp, storage.join(out, shards[-1]["name"]))

        for sample in samples:
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r}")
            seen.add(sample.key)
            if tar is None or shards[-1]["count"] >= shard_size:
                if tar is not None:
                    close()
                shards.append({"name": f"{prefix}-{len(shards):06d}.tar", "count": 0})
                tmp = os.path.join(scratch, shards[-1]["name"])
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
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
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def shard_name(location: str | os.PathLike[str]) -> str:
    """Output stem of a shard: its file name without ``.tar`` (or ``.tar.gz``, ``.tgz``, ...)."""
    name = storage.basename(os.fspath(location))
    return _TAR_SUFFIX.sub("", name)


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard locations from a list, a glob (``*.tar``) or a brace pattern
    (``imagenet-{000000..000009}.tar``), local or on an object store (``s3://bucket/x-*.tar``).

    Raises:
        FileNotFoundError: nothing matches (the message names the pattern).
        ValueError: a reversed brace range.
    """
    if not isinstance(shards, (str, os.PathLike)):
        return [os.fspath(s) for s in shards]
    pattern = os.fspath(shards)
    names = _braces(pattern)
    found: list[str] = []
    literal: dict[str, list[str]] = {}  # folder -> names to check with one listing
    for name in names:
        if glob.has_magic(name):
            found += storage.glob(name)
        else:
            literal.setdefault(storage.parent(name), []).append(name)
    missing: list[str] = []
    for folder, wanted in literal.items():
        if len(wanted) == 1:
            present = {wanted[0]} if storage.is_file(wanted[0]) else set()
        else:
            listed = set(storage.list_files(folder))
            present = {w for w in wanted
                       if (w if storage.is_uri(w) else os.path.join(folder, storage.basename(w))) in listed}
        found += [w for w in wanted if w in present]
        missing += [w for w in wanted if w not in present]
    if missing and len(names) > 1:  # a brace range or list that names a shard which is not there
        shown = ", ".join(storage.redact(m) for m in missing[:3])
        raise FileNotFoundError(f"{len(missing)} shard(s) of {storage.redact(pattern)} do not exist: {shown}")
    if not found:
        raise FileNotFoundError(f"no shard matches {storage.redact(pattern)}")
    return list(dict.fromkeys(found))


def _braces(pattern: str) -> list[str]:
    """Expand every ``{lo..hi}`` numeric range (zero-padded to ``lo``'s width)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.groups()
    if int(hi) < int(lo):
        raise ValueError(f"reversed brace range {{{lo}..{hi}}} in {storage.redact(pattern)}")
    heads = [pattern[: match.start()] + str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return [h + rest for h in heads for rest in _braces(pattern[match.end():])]


class DamagedShardError(Exception):
    """A tar that ends or breaks mid-way; ``key`` is the sample being read (None if none)."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(reason)
        self.key = key


class _StrictTarInfo(tarfile.TarInfo):
    """A header that :mod:`tarfile` would read as "end of archive" although it is damaged or missing
    (a bad checksum, a cut file) raises instead: Python's reader silently stops at such a header
    after the first member, which would turn a damaged shard into a short, "complete" one. Two
    blocks of zeros (the proper end-of-archive marker) still end the archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            # A zero block. The proper end of an archive is two of them; one zero block followed by more
            # data is a member header that was zeroed (data would silently stop there).
            at = tar.offset
            following = tar.fileobj.read(tarfile.BLOCKSIZE)
            if following.strip(b"\0") and at > 0:
                raise tarfile.ReadError(f"a zeroed member header at byte {at}, followed by more data") from None
            raise
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]
            if tar.offset == 0:
                raise
            raise tarfile.ReadError(f"the archive ends at byte {tar.offset} without an end-of-archive marker "
                                    "(cut short?)") from None
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            if tar.offset == 0:
                raise
            raise tarfile.ReadError(f"damaged member header at byte {tar.offset}: {exc}") from None


def member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member path: ``("train/x", "seg.png")`` for ``train/x.seg.png`` (the key
    is the path up to the first dot of the basename, folders included; the extension is lower-cased)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Consecutive members with the same key, as ``(key, {ext: bytes}, problem)``; ``problem`` names
    what is wrong with the sample (a duplicate member, a link or device member), else None.

    Raises:
        DamagedShardError: the archive is truncated or corrupt; complete samples before it were yielded.
        storage.StorageError: the shard could not be read (I/O, after retries): not damage in the data.
    """
    key: str | None = None  # the key yielded for the current sample
    raw: str | None = None  # its members' key
    parts: dict[str, bytes] = {}
    problems: list[str] = []
    seen: dict[str, int] = {}  # keys already yielded, and how often: a key that comes back is an error
    members = iter(tar)
    while True:
        try:
            member = next(members, None)
            if member is None:
                break
            shown = _printable(member.name)
            k, ext = member_key(shown)
            if k != raw:
                if key is not None:
                    yield key, parts, "; ".join(problems) or None
                    parts, problems = {}, []
                raw, key, n = k, k, seen.get(k, 0)
                seen[k] = n + 1
                if n:  # under a key of its own, so rows stay unique per key: "<key>:repeat1", ...
                    key = f"{k}:repeat{n}"
                    problems.append(f"key {k} appears again after other samples (its members are not consecutive)")
            if shown != member.name:
                problems.append(f"member name {shown} is not valid UTF-8")
            if not member.isfile():
                if not member.isdir():
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    problems.append(f"member {shown} is a {kind}, not a file (skipped)")
                continue
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {shown} is truncated")
        except storage.StorageError:
            raise
        except DATA_ERRORS as exc:
            raise DamagedShardError(key, f"{type(exc).__name__}: {exc}") from exc
        if ext in parts:
            problems.append(f"duplicate member {shown}")
        parts[ext] = data
    if key is not None:
        yield key, parts, "; ".join(problems) or None


def _printable(text: str) -> str:
    """``text`` with undecodable bytes (tar names are decoded with surrogateescape) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decode_sample(key: str, parts: dict[str, bytes], size: tuple[int, int]) -> dict[str, Any]:
    """Decode one sample's members: image resized to ``size`` (``3×H×W`` in ``[0, 1]``, by the per-mode
    rules of :func:`unioncam.viz.pil_to_tensor`), label, and boxes rescaled to the resized image. An image
    whose header claims more than :data:`unioncam.viz.MAX_PIXELS` pixels is refused before it is decoded.
    Raises ``ValueError`` with the reason on failure."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        raise ValueError(f"no image member (have: {', '.join(sorted(parts)) or 'nothing'})")
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad metadata {key}.json: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"bad metadata {key}.json: a {type(meta).__name__}, not an object")
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 writer (Arrow) takes
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"bad metadata {key}.json: text that is not valid Unicode (a lone surrogate)") from None
    if isinstance(meta.get("error"), str):  # the converter could not read the image (unioncam.data.voc)
        raise ValueError(meta["error"])
    try:
        # the header only, and only raster formats that decode in PIL itself (never EPS through Ghostscript)
        img = Image.open(io.BytesIO(parts[ext]), formats=IMAGE_FORMATS)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode {key}.{ext}: {type(exc).__name__}: {exc}") from exc
    with img:
        width, height = img.size
        try:
            check_pixels(img)  # a decompression bomb is refused before any pixel is allocated
        except ValueError as exc:
            raise ValueError(f"{key}.{ext}: {exc}") from None
        try:
            img.load()
            image = pil_to_tensor(img, size)
        except Exception as exc:  # PIL raises many types for corrupt data
            raise ValueError(f"cannot decode {key}.{ext}: {type(exc).__name__}: {exc}") from exc
    if "cls" not in parts:
        raise ValueError(f"missing label ({key}.cls)")
    text = parts["cls"].decode("utf-8", "replace").strip()
    if not re.fullmatch(r"[0-9]{1,9}", text):  # int() would take "1_0", "+1", " 1" or 10**12
        raise ValueError(f"bad label {parts['cls'][:20]!r}: a class index 0..999999999 is expected")
    label = int(text)
    boxes = meta.get("boxes", [])
    if not isinstance(boxes, list) or not all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in b) for b in boxes):
        raise ValueError(f"bad boxes in {key}.json: a list of [xmin, ymin, xmax, ymax] numbers is expected")
    sx, sy = size[1] / width, size[0] / height
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    return {"key": key, "image": image, "label": label, "boxes": boxes, "meta": meta,
            "orig_size": (height, width)}


class _Hashed(io.RawIOBase):
    """A stream read through, its bytes hashed into ``digest`` as they are read."""

    def __init__(self, stream: Any, digest: Any) -> None:
        super().__init__()
        self.stream, self.digest = stream, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        self.digest.update(data)
        buffer[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Hash the rest (a tar's trailing blocks, or all after a reader stopped early)."""
        while block := self.stream.read(1 << 20):
            self.digest.update(block)


def iter_samples(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 size: tuple[int, int] = (224, 224), digest: Any = None) -> Iterator[dict[str, Any]]:
    """Yield decoded samples (``key``, ``shard``, ``image``, ``label``, ``boxes``, ``meta``) or error
    records (``key``, ``shard``, ``error``) from WebDataset shards (``.tar``, or compressed:
    ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``), streamed from disk or an object store.

    ``boxes`` are ``[xmin, ymin, xmax, ymax]`` rescaled to the resized image (see
    :mod:`unioncam.evaluation` for the convention). Damage *in the data* becomes error records: a
    sample that cannot be decoded, has a duplicate member or malformed metadata gets one of its own;
    a truncated or corrupt tar yields every complete sample before the damage, then one error record
    for the sample it broke in (key ``"<shard>:damaged"`` when no sample had started).

    ``digest`` (a ``hashlib`` object, one shard): every byte of the shard is hashed into it as it is
    read, the rest too when reading stops early or at damage, so the caller has the shard's hash
    without reading it a second time (complete once this generator is exhausted or closed).

    Raises:
        storage.StorageError: a shard could not be *read* (permission, I/O, network, after retries).
            That is not damage in the data, so it is raised, never recorded: the shard stays retryable.
    """
    for path in expand_shards(shards):
        name = storage.basename(path)
        try:
            with storage.open_input(path) as raw, \
                    contextlib.ExitStack() as finish:
                stream: Any = raw
                if digest is not None:
                    stream = _Hashed(raw, digest)
                    finish.callback(stream.drain)  # after the tar is done with it (or broke on it)
                tar = finish.enter_context(tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo))
                for key, parts, problem in _group(tar):
                    if not parts and not problem:  # only directory members (``tar cf`` adds them): not a sample
                        continue
                    if problem:
                        yield {"key": key, "shard": name, "error": problem}
                        continue
                    try:
                        yield {"shard": name, **decode_sample(key, parts, size)}
                    except ValueError as exc:
                        yield {"key": key, "shard": name, "error": str(exc)}
        except storage.StorageError:
            raise
        except DamagedShardError as exc:
            yield {"key": exc.key or f"{name}:damaged", "shard": name, "error": f"truncated or corrupt tar: {exc}"}
        except DATA_ERRORS as exc:
            yield {"key": f"{name}:damaged", "shard": name, "error": f"unreadable tar: {exc}"}


def count_samples(path: str) -> int:
    """How many records :func:`iter_samples` yields for the shard ``path`` (samples and error records
    alike), read without decoding an image, so a progress total is one the count can reach.

    Raises:
        storage.StorageError: the shard could not be read.
    """
    n = 0
    try:
        with storage.open_input(path) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for _, parts, problem in _group(tar):
                n += bool(parts or problem)
    except storage.StorageError:
        raise
    except (DamagedShardError, *DATA_ERRORS):  # iter_samples yields one error record for the damage
        n += 1
    return n


def prefetched(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """``items`` produced on a background thread, up to ``depth`` ahead of the consumer, so decoding
    (and reading from storage) overlaps the caller's GPU work. An exception raised by ``items`` is
    raised here, in order; closing this generator stops the thread and waits for it (``items`` is
    closed by then)."""
    import queue
    import threading

    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        """Hand ``entry`` over unless the consumer has stopped; False when it has."""
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            final: tuple[str, Any] = ("end", None)
        except BaseException as exc:  # handed to the consumer
            final = ("error", exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        put(final)

    thread = threading.Thread(target=produce, name="unioncam-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                box.get_nowait()
        thread.join()  # the producer has closed ``items`` (e.g. a digest of the shard is complete)
        thread.join(timeout=5)
