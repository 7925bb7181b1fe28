"""Paths and URIs: the one place that reads, lists and writes files, on local disk or object storage.

Every location unioncam takes (shards, weights, the run directory, report files) is either a local
path (``runs/x``, ``/data/x``, ``file:///data/x``) or a URI that :mod:`pyarrow.fs` opens natively
(``s3://bucket/key``, ``gs://bucket/key``, and any other scheme ``pyarrow.fs.FileSystem.from_uri``
knows). Credentials and endpoints come from each store's standard environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, instance roles); nothing here reads or prints them, and
:func:`redact` masks a ``user:password@`` part of any URI before it is logged or stored.

Decisions:
- **Write once, under the final name.** Object stores have no rename, and one PUT is atomic, so
  :func:`write_bytes` sends each object's whole content in one write (a half-written object never
  becomes visible). Locally it writes a temporary file beside the target, fsyncs it, renames it into
  place and fsyncs the folder, so a crash leaves the old file or the new one, never part of one.
- **Transient errors are retried**: an ``OSError`` that is not "not found", "access denied" or
  another permanent answer (connection resets, 5xx, throttling) is retried up to :data:`RETRIES`
  times with exponential backoff (:data:`BACKOFF` seconds, doubled each time); reading resumes at
  the byte where it broke. What still fails is raised as :class:`StorageError` naming the URI.
- **Exclusive creation** (:func:`create_exclusive`, the run lock) uses ``O_CREAT | O_EXCL``
  locally and S3's conditional PUT (``If-None-Match: *``, through boto3) on ``s3://``; pyarrow
  sends no conditional headers. GCS uses ``if_generation_match=0`` through google-cloud-storage.
- **Stamps** (:func:`stamp`, :func:`list_stamps`: what tells a rewritten file without reading it) are
  size and modification time; on ``s3://`` with boto3 installed the ETag too (S3 reports modification
  times in whole seconds, so a same-size overwrite within a second would keep a time-based stamp).
  :func:`stamps_match` compares them, a stamp recorded without the ETag on its size and seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

RETRIES = 4
BACKOFF = 0.5
READ_BUFFER = 8 << 20  # bytes per ranged GET when streaming an object
_PERMANENT = re.compile(r"ACCESS_DENIED|AccessDenied|NO_SUCH_BUCKET|NoSuchBucket|InvalidAccessKeyId|"
                        r"SignatureDoesNotMatch|INVALID_ACCESS_KEY|Forbidden|\b403\b|\b404\b|NoSuchKey|"
                        r"does not exist|InvalidBucketName", re.IGNORECASE)
T = TypeVar("T")


class StorageError(OSError):
    """A location could not be read, listed or written (after retries); the message names it."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those go through :mod:`pyarrow.fs`).

    Raises:
        StorageError: a malformed URI: ``s3:/bucket`` (one slash), or a query or fragment (``?x=1``,
            ``#x``), which object paths here never carry (a bare ``?`` is a glob character).
    """
    text = os.fspath(location)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]{1,}:/(?!/)", text):
        raise StorageError(f"malformed URI {redact(text)!r}: write scheme://bucket/path")
    uri = bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text)) and not text.startswith("file://")
    if uri and ("=" in urlsplit(text).query or urlsplit(text).fragment):  # a bare "?" is a glob character
        raise StorageError(f"URI {redact(text)} has a query or fragment; give the object path only")
    return uri


def local_path(location: str | os.PathLike[str]) -> str:
    """A local location as a plain path (``file:///x`` → ``/x``)."""
    text = os.fspath(location)
    return urlsplit(text).path if text.startswith("file://") else text


def absolute(location: str | os.PathLike[str]) -> str:
    """Local paths made absolute (so other processes and nodes find them); URIs unchanged."""
    text = os.fspath(location)
    return text if is_uri(text) else os.path.abspath(local_path(text))


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a path or a URI."""
    text = os.fspath(base)
    if not is_uri(text):
        return os.path.join(local_path(text), *parts)
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(location: str) -> str:
    """The folder holding ``location``."""
    if not is_uri(location):
        return os.path.dirname(local_path(location)) or "."
    return location.rstrip("/").rpartition("/")[0]


def basename(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2]


def redact(location: str | os.PathLike[str]) -> str:
    """``location`` with any ``user:password@`` and secret-looking query values masked."""
    text = os.fspath(location)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = re.sub(r"(?i)((?:secret|token|key|password|credential)[^=&]*=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> Any:  # a pyarrow.fs.FileSystem
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
    except ValueError as exc:  # pyarrow: ArrowInvalid (a ValueError) for unknown schemes
        raise StorageError(f"no filesystem for {scheme}:// URIs ({_one_line(exc)}); "
                           "pyarrow.fs opens s3://, gs://, hdfs:// and local paths") from None
    except OSError as exc:  # e.g. the bucket's region cannot be looked up
        raise StorageError(f"cannot reach {scheme}://{netloc.rpartition('@')[2]}/: {_one_line(exc)}") from None
    return fs


@dataclass(frozen=True)
class _Remote:
    fs: object  # pyarrow.fs.FileSystem
    path: str  # bucket/key


def _remote(uri: str) -> _Remote:
    parts = urlsplit(uri)
    fs = _filesystem(parts.scheme, parts.netloc)
    host = parts.netloc.rpartition("@")[2]
    return _Remote(fs, f"{host}{parts.path}".rstrip("/"))


def _s3_client(netloc: str) -> Any | None:
    """A boto3 S3 client for ``s3://netloc`` (``AWS_ENDPOINT_URL`` honoured, and a ``key:secret@``
    in ``netloc`` as pyarrow takes it), one per bucket and endpoint; None when boto3 is not installed."""
    return _s3_client_at(netloc, os.environ.get("AWS_ENDPOINT_URL") or None)


_S3_CLIENTS = threading.Lock()  # boto3 sessions are not thread-safe: one client is built at a time


@functools.lru_cache(maxsize=32)
def _s3_client_at(netloc: str, endpoint: str | None) -> Any | None:
    try:
        import boto3
    except ImportError:
        return None
    user, _, _ = netloc.rpartition("@")
    key, _, secret = user.partition(":")
    creds = {"aws_access_key_id": unquote(key), "aws_secret_access_key": unquote(secret)} if key else {}
    with _S3_CLIENTS:  # its own session: the environment's credentials as they are now, not the default session's
        return boto3.session.Session().client("s3", endpoint_url=endpoint, **creds)


def _s3_call(what: str, call: Callable[[], T]) -> T:
    """``call()`` (a boto3 request) retried like pyarrow's, its botocore errors as ``OSError`` (a 404 as
    ``FileNotFoundError``)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    def attempt() -> T:
        try:
            return call()
        except (ParamValidationError, NoCredentialsError, PartialCredentialsError) as exc:  # permanent: no retry
            raise StorageError(f"cannot {what}: {_one_line(exc)}") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise FileNotFoundError("not found") from None
            if code in ("403", "AccessDenied"):
                raise PermissionError(_one_line(exc)) from None
            raise OSError(_one_line(exc)) from None
        except BotoCoreError as exc:
            raise OSError(_one_line(exc)) from None

    return retrying(f"cannot {what}", attempt)


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()[:300]


def is_transient(exc: BaseException) -> bool:
    """An I/O error worth retrying: not "not found", "access denied" or another permanent answer."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC,
                                                   errno.EROFS, errno.EISDIR, errno.ENOTDIR):
        return False
    return isinstance(exc, OSError) and not _PERMANENT.search(str(exc))


def retrying(what: str, call: Callable[[], T], retries: int | None = None) -> T:
    """``call()``, retried with exponential backoff while it raises a transient ``OSError``.

    Raises:
        StorageError: the last error (transient or permanent), prefixed with ``what``.
    """
    attempts = RETRIES if retries is None else retries
    for attempt in range(attempts + 1):
        try:
            return call()
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            if attempt < attempts and is_transient(exc):
                time.sleep(BACKOFF * 2 ** attempt)
                continue
            kind = type(exc) if isinstance(exc, (FileNotFoundError, PermissionError)) else StorageError
            tries = f" (after {attempt + 1} attempts)" if attempt else ""
            raise _error(kind, f"{what}: {_one_line(exc)}{tries}") from None
    raise AssertionError("unreachable")


def _error(kind: type[OSError], message: str) -> OSError:
    """A ``FileNotFoundError``/``PermissionError`` keeps its type (callers test for it), as a StorageError."""
    if kind is StorageError:
        return StorageError(message)
    return type(f"Storage{kind.__name__}", (StorageError, kind), {})(message)


# -- queries ----------------------------------------------------------------------------------------
def file_info(location: str) -> tuple[str, int | None]:
    """``("file" | "dir" | "missing", size)`` of a location."""
    if not is_uri(location):
        path = local_path(location)
        if os.path.isfile(path):
            return "file", os.path.getsize(path)
        return ("dir", None) if os.path.isdir(path) else ("missing", None)
    import pyarrow.fs as pafs

    r = _remote(location)
    info = retrying(f"cannot stat {redact(location)}", lambda: r.fs.get_file_info(r.path))  # type: ignore[attr-defined]
    kind = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "missing")
    return kind, info.size if kind == "file" else None


def is_file(location: str) -> bool:
    return file_info(location)[0] == "file"


def list_files(folder: str, suffix: str = "", recursive: bool = False, limit: int | None = None) -> list[str]:
    """Files directly in ``folder`` (or below it) whose names end with ``suffix``, sorted; ``[]`` when
    the folder does not exist."""
    if not is_uri(folder):
        root = local_path(folder)
        if not os.path.isdir(root):
            return []
        if recursive:
            found = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
        else:
            found = [os.path.join(root, f) for f in os.listdir(root) if os.path.isfile(os.path.join(root, f))]
        return sorted(f for f in found if f.endswith(suffix))[:limit]
    import pyarrow.fs as pafs

    r = _remote(folder)
    selector = pafs.FileSelector(r.path, recursive=recursive, allow_not_found=True)
    infos = retrying(f"cannot list {redact(folder)}", lambda: r.fs.get_file_info(selector))  # type: ignore[attr-defined]
    scheme_host = folder[: len(folder) - len(urlsplit(folder).path)].rstrip("/")
    host = urlsplit(folder).netloc.rpartition("@")[2]
    out = sorted(f"{scheme_host}{i.path[len(host):]}" for i in infos
                 if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if not infos:  # an empty prefix is fine; a missing bucket is an error
        bucket = r.path.partition("/")[0]
        bucket_info = retrying(f"cannot list {redact(folder)}", lambda: r.fs.get_file_info(bucket))  # type: ignore[attr-defined]
        if bucket_info.type == pafs.FileType.NotFound:
            raise StorageError(f"cannot list {redact(folder)}: the bucket {bucket!r} does not exist")
    return out[:limit]


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern (``*``, ``?``, ``[...]``; ``*`` never crosses ``/``), sorted.

    Locally this is :func:`glob.glob`; on object stores the longest literal prefix is listed and
    each path component is matched with :func:`fnmatch.fnmatchcase`, so a pattern selects the same
    files in both places (names starting with a dot match only a pattern part that does too).
    """
    import glob as _glob

    if not is_uri(pattern):
        path = local_path(pattern)
        return sorted(f for f in _glob.glob(path) if os.path.isfile(f))
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if _glob.has_magic(p)), len(parts))
    if fixed == len(parts):
        return [pattern] if is_file(pattern) else []
    base = "/".join(parts[:fixed])
    candidates = list_files(base, recursive=fixed < len(parts) - 1)
    want = parts[fixed:]

    def matches(path: str) -> bool:
        have = path[len(base) + 1:].split("/")
        return len(have) == len(want) and all(
            fnmatch.fnmatchcase(h, w) and (w.startswith(".") or not h.startswith("."))
            for h, w in zip(have, want, strict=True))

    return [c for c in candidates if matches(c)]


# -- reading ----------------------------------------------------------------------------------------
class _ResumingReader(io.RawIOBase):
    """A read-only stream over a file or object that reopens at the current offset on a transient
    error (bounded retries with backoff), so one dropped connection does not cost the whole shard."""

    def __init__(self, location: str) -> None:
        super().__init__()
        self.location = location
        self.pos = 0
        self.handle: IO[bytes] | None = None
        self._open()

    def _open_at(self) -> IO[bytes]:
        """The file or object, positioned at :attr:`pos` (no retry: callers wrap it in :func:`retrying`)."""
        if not is_uri(self.location):
            handle: IO[bytes] = open(local_path(self.location), "rb")  # noqa: SIM115 (closed in close())
            handle.seek(self.pos)
            return handle
        import pyarrow as pa

        r = _remote(self.location)
        raw = r.fs.open_input_file(r.path)  # type: ignore[attr-defined]
        raw.seek(self.pos)
        return pa.BufferedInputStream(raw, READ_BUFFER)

    def _open(self) -> None:
        self.handle = retrying(f"cannot open {redact(self.location)}", self._open_at)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        def read() -> int:
            if self.handle is None:  # dropped by a failed attempt: reopen where it broke
                self.handle = self._open_at()
            try:
                data = self.handle.read(len(buffer))
            except OSError:
                self._close_handle()
                raise
            buffer[: len(data)] = data
            self.pos += len(data)
            return len(data)

        return retrying(f"cannot read {redact(self.location)} at byte {self.pos}", read)

    def _close_handle(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None

    def close(self) -> None:
        self._close_handle()
        super().close()


def open_input(location: str) -> IO[bytes]:
    """A buffered binary stream over ``location`` that survives transient errors (see module doc).

    Raises:
        FileNotFoundError / PermissionError (as :class:`StorageError`): permanent answers.
        StorageError: anything else after the retries.
    """
    return io.BufferedReader(_ResumingReader(location), buffer_size=1 << 20)


def open_random(location: str) -> IO[bytes]:
    """A seekable binary file over ``location`` (for formats read from the end, such as Parquet);
    opening is retried like :func:`open_input`, each ranged read relies on the store client."""
    if not is_uri(location):
        return retrying(f"cannot open {location}", lambda: open(local_path(location), "rb"), retries=0)
    r = _remote(location)
    return retrying(f"cannot open {redact(location)}", lambda: r.fs.open_input_file(r.path))  # type: ignore[attr-defined]


def read_bytes(location: str) -> bytes:
    with open_input(location) as handle:
        return handle.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def iter_chunks(location: str, size: int = 1 << 20) -> Iterator[bytes]:
    with open_input(location) as handle:
        while block := handle.read(size):
            yield block


# -- writing ----------------------------------------------------------------------------------------
def write_bytes(location: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` as ``location``, all or nothing (see the module docstring). ``durable=False``
    (advisory files such as a worker's ``running/`` marker) skips the fsyncs of a local file and
    its folder: still all or nothing (a rename), but a crash may lose it."""
    if not is_uri(location):
        retrying(f"cannot write {location}", lambda: _write_local(local_path(location), data, durable), retries=0)
        return
    _upload(location, lambda: iter((data,)))


def _upload(location: str, chunks: Callable[[], Iterator[bytes]]) -> None:
    """Upload ``chunks()`` (called again on each retry) as the object ``location``: pyarrow sends one
    PUT, or a multipart upload for large objects, which the store makes visible only once complete."""
    r = _remote(location)

    def put() -> None:
        stream = r.fs.open_output_stream(r.path)  # type: ignore[attr-defined]
        try:
            for chunk in chunks():
                stream.write(chunk)
            stream.close()
        except OSError:
            # pyarrow has no abort: if closing completed a partial upload, remove it (resume would
            # reject it by its footer anyway, but other readers must not see it)
            with contextlib.suppress(Exception):
                stream.close()
            with contextlib.suppress(Exception):
                r.fs.delete_file(r.path)  # type: ignore[attr-defined]
            raise

    retrying(f"cannot write {redact(location)}", put)


def write_text(location: str, text: str, durable: bool = True) -> None:
    write_bytes(location, text.encode("utf-8"), durable)


def file_mode() -> int:
    """The mode of a new file under this process's umask (``0o644`` under umask 022), as ``open()``
    gives: the files unioncam writes through a temporary file (``mkstemp`` makes them 0600) get it
    too, so colleagues on shared storage can read the results their umask lets them."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:  # Linux: read without changing it
            found = re.search(r"^Umask:\s*([0-7]+)", handle.read(), re.MULTILINE)
        if found:
            return 0o666 & ~int(found.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window, at a write)
    os.umask(mask)
    return 0o666 & ~mask


def _write_local(path: str, data: bytes, durable: bool = True) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def put_file(local: str, location: str) -> None:
    """Move the finished local file ``local`` to ``location``: fsync and rename when ``location`` is
    local (same file system: ``local`` should sit in the same folder), else one upload, after
    which ``local`` is removed."""
    if not is_uri(location):
        with open(local, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(local, file_mode())  # a temporary file (0600): the umask's mode, as a file written in place
        dest = local_path(location)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        try:
            os.replace(local, dest)
        except OSError:  # another file system: copy under a temporary name, fsync, then rename
            tmp = f"{dest}.tmp-{os.getpid()}"
            shutil.copyfile(local, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
            os.unlink(local)
        _fsync_dir(os.path.dirname(os.path.abspath(dest)))
        return
    def chunks() -> Iterator[bytes]:  # streamed: a large file is never held in memory whole
        with open(local, "rb") as handle:
            while block := handle.read(READ_BUFFER):
                yield block

    _upload(location, chunks)
    os.unlink(local)


def delete(location: str) -> None:
    """Remove a file or object; a missing one is fine."""
    if not is_uri(location):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_path(location))
        return
    r = _remote(location)

    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            r.fs.delete_file(r.path)  # type: ignore[attr-defined]

    retrying(f"cannot delete {redact(location)}", remove)


def create_exclusive(location: str, data: bytes) -> bool:
    """Create ``location`` holding ``data`` only if it does not exist; True when this call created it.

    Raises:
        StorageError: the store cannot create objects exclusively (no client library installed for
            the conditional request), or the request failed.
    """
    if not is_uri(location):
        path = local_path(location)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True
    parts = urlsplit(location)
    bucket, key = parts.netloc.rpartition("@")[2], parts.path.lstrip("/")
    if parts.scheme == "s3":
        client = _s3_client(parts.netloc)
        if client is None:
            raise StorageError(f"creating {redact(location)} exclusively needs boto3 (pip install "
                               "'unioncam[s3]'): pyarrow sends no conditional requests")
        from botocore.exceptions import ClientError

        def put() -> bool:
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise OSError(f"{code}: {exc.response.get('Error', {}).get('Message', '')}") from None

        return retrying(f"cannot create {redact(location)}", put)
    if parts.scheme in ("gs", "gcs"):
        try:
            from google.api_core.exceptions import PreconditionFailed
            from google.cloud import storage as gcs
        except ImportError:
            raise StorageError(f"creating {redact(location)} exclusively needs google-cloud-storage "
                               "(pip install google-cloud-storage)") from None

        def upload() -> bool:
            try:
                gcs.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
                return True
            except PreconditionFailed:
                return False

        return retrying(f"cannot create {redact(location)}", upload)
    raise StorageError(f"cannot create {redact(location)} exclusively: {parts.scheme}:// has no conditional write")


def stamp(location: str) -> str | None:
    """What changes whenever a file is rewritten, read without reading its content: ``"<bytes>:<mtime_ns>"``
    for a local file (a ``stat``); on object stores the size and last-modified time in whole seconds,
    ``"<bytes>:<s>s"`` (one HEAD), which an overwrite of the same size within the same second keeps, so on
    ``s3://`` with boto3 installed the ETag follows, ``"<bytes>:<s>s:<ETag>"`` (the content's MD5 for a
    single-part upload; it changes with every overwrite of other content); None where the store reports no
    modification time. Compare stamps with :func:`stamps_match`. Equal stamps let a check skip hashing; a
    change that keeps the stamp (bit rot, a restored mtime) needs a hash (``unioncam verify --deep``).

    Raises:
        StorageError: the location cannot be read (``FileNotFoundError`` when it is missing).
    """
    if not is_uri(location):
        try:
            st = os.stat(local_path(location))
        except FileNotFoundError:
            raise _error(FileNotFoundError, f"{location} is missing") from None
        return f"{st.st_size}:{st.st_mtime_ns}"
    head = _s3_head(location)
    if head is not None:
        return head[1]
    r = _remote(location)
    info = retrying(f"cannot stat {redact(location)}", lambda: r.fs.get_file_info(r.path))  # type: ignore[attr-defined]
    if info.size is None:
        raise _error(FileNotFoundError, f"{redact(location)} is missing")
    return _remote_stamp(info)


def stamps_match(recorded: str | None, now: str | None) -> bool:
    """Whether a stamp recorded earlier (:func:`stamp`) says the file is unchanged now. An ``s3://`` stamp
    without its ETag (recorded before stamps had one, or where boto3 is not installed) is compared on the
    size and seconds both forms have; two absent stamps (a store without modification times) match, as
    nothing tells them apart."""
    if recorded == now:
        return True
    if recorded is None or now is None:
        return False
    short, long = sorted((recorded, now), key=len)
    return short.endswith("s") and long.startswith(short + ":")


def _s3_stamp(size: int, modified: Any, etag: str) -> str:
    return f"{size}:{int(modified.timestamp())}s:{str(etag).strip(chr(34))}"


def _s3_head(location: str) -> tuple[int, str, str] | None:
    """An ``s3://`` object's size, stamp and ETag from one HEAD through boto3; None for other stores or
    without boto3."""
    parts = urlsplit(location)
    client = _s3_client(parts.netloc) if parts.scheme == "s3" else None
    if client is None:
        return None
    head = _s3_call(f"stat {redact(location)}", lambda: client.head_object(
        Bucket=parts.netloc.rpartition("@")[2], Key=parts.path.lstrip("/")))
    size, etag = int(head["ContentLength"]), str(head["ETag"]).strip('"')
    return size, _s3_stamp(size, head["LastModified"], etag), etag


def _remote_stamp(info: Any) -> str | None:
    """An object's stamp from its ``pyarrow.fs.FileInfo`` (stores other than S3 with boto3): size and
    modification time in whole seconds (``"<bytes>:<s>s"``), the precision both a HEAD and a listing report."""
    return None if info.mtime_ns is None else f"{info.size}:{info.mtime_ns // 1_000_000_000}s"


def list_stamps(folder: str, suffix: str = "") -> dict[str, str | None]:
    """``{location: stamp}`` (:func:`stamp`) of the files directly in ``folder`` whose names end with
    ``suffix``, from one listing (a paginated LIST on object stores, no HEAD per object); ``{}``
    when the folder does not exist."""
    if not is_uri(folder):
        root = local_path(folder)
        found: dict[str, str | None] = {}
        try:
            entries = list(os.scandir(root))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        for entry in entries:
            if entry.name.endswith(suffix) and entry.is_file():
                st = entry.stat()
                found[join(folder, entry.name)] = f"{st.st_size}:{st.st_mtime_ns}"
        return found
    parts = urlsplit(folder)
    client = _s3_client(parts.netloc) if parts.scheme == "s3" else None
    if client is not None:
        prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""

        def listing() -> dict[str, str | None]:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=parts.netloc.rpartition("@")[2], Prefix=prefix, Delimiter="/")
            return {join(folder, item["Key"][len(prefix):]): _s3_stamp(item["Size"], item["LastModified"], item["ETag"])
                    for page in pages for item in page.get("Contents", ())
                    if item["Key"].endswith(suffix) and item["Key"] != prefix}

        try:
            return _s3_call(f"list {redact(folder)}", listing)
        except FileNotFoundError:  # no such bucket
            return {}
    import pyarrow.fs as pafs

    r = _remote(folder)
    selector = pafs.FileSelector(r.path, recursive=False, allow_not_found=True)
    infos = retrying(f"cannot list {redact(folder)}", lambda: r.fs.get_file_info(selector))  # type: ignore[attr-defined]
    return {join(folder, i.base_name): _remote_stamp(i) for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(suffix)}


def fingerprint(location: str, content: bool = True) -> dict[str, Any]:
    """What identifies a file's content, to tell later whether it changed: ``{"uri", "bytes",
    "stamp", "sha256"}`` for local files, ``{"uri", "bytes", "stamp", "etag"}`` for ``s3://`` objects
    (a HEAD request, through boto3 when installed), else ``sha256`` streamed. ``uri`` is redacted (no
    credentials); ``stamp`` (:func:`stamp`) is taken first, so a file rewritten while it is hashed
    shows another stamp at the next check. ``content=False`` leaves the sha256 out (a caller that
    reads the file anyway hashes it as it reads: :func:`unioncam.data.shards.iter_samples`).

    Raises:
        StorageError: the location cannot be read (``FileNotFoundError`` when it is missing).
    """
    head = _s3_head(location)
    if head is not None:  # one HEAD gives the size, the stamp and the ETag (a missing object: FileNotFoundError)
        return {"uri": redact(location), "bytes": head[0], "stamp": head[1], "etag": head[2]}
    kind, size = file_info(location)
    if kind != "file":
        raise _error(FileNotFoundError, f"{redact(location)} is not a file")
    found: dict[str, Any] = {"uri": redact(location), "bytes": size, "stamp": stamp(location)}
    if content:
        found["sha256"] = sha256(location)
    return found


def sha256(location: str) -> str:
    """Hex SHA-256 of a file's or object's bytes (streamed)."""
    import hashlib

    digest = hashlib.sha256()
    for block in iter_chunks(location):
        digest.update(block)
    return digest.hexdigest()
