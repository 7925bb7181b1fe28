"""A real S3 endpoint for the tests: moto's standalone server on 127.0.0.1, and a fault proxy in front.

:class:`S3` starts ``moto.server.ThreadedMotoServer`` on a free loopback port (a real HTTP S3 API:
pyarrow and boto3 talk to it exactly as to AWS) and a small HTTP proxy that forwards every request
to it, except that it can answer ``500`` a given number of times, or cut a response short, for keys
containing a given text. The credentials are fake, but the tests check that the secret never
reaches an output.
"""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SECRET = "unioncam-test-secret-Zq8vX2"  # searched for in every output object
ACCESS_KEY = "AKIAUNIONCAMTEST"


@dataclass
class Faults:
    """What the proxy does to requests whose path contains ``match``."""

    match: str = ""
    fail: int = 0  # answer an error this many times (then forward normally); -1: always
    status: int = 500  # the error: 500 InternalError, or 403 AccessDenied
    cut_after: int = 0  # when > 0: send only this many body bytes of the next GET, then drop the connection
    seen: list[str] = field(default_factory=list)


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.faults, self.lock = upstream, faults, threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        faults = self.server.faults
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        hit = bool(faults.match) and faults.match in self.path
        with self.server.lock:
            fail = hit and faults.fail != 0
            if fail and faults.fail > 0:
                faults.fail -= 1
            cut = hit and self.command == "GET" and faults.cut_after > 0 and not fail
            cut_at = faults.cut_after
            if cut:
                faults.cut_after = 0
            if hit:
                faults.seen.append(f"{self.command} {faults.status if fail else 'cut' if cut else 'ok'}")
        if fail:
            code = b"AccessDenied" if faults.status == 403 else b"InternalError"
            payload = b"<Error><Code>" + code + b"</Code><Message>injected</Message></Error>"
            self.send_response(faults.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "proxy-connection", "transfer-encoding", "expect",
                                        "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # HEAD: the upstream's length of the object (there is no body)
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if cut:
            self.wfile.write(data[:cut_at])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data)
        conn.close()

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 (http.server's names)


@dataclass
class S3:
    """A running endpoint: ``endpoint`` (moto directly), ``proxy`` (through the fault proxy)."""

    endpoint: str
    proxy: str
    faults: Faults

    def env(self, through_proxy: bool = False) -> dict[str, str]:
        """The standard AWS variables that point a client at this endpoint."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.proxy if through_proxy else self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def all_bytes(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``: key → content."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out


@contextmanager
def s3_server() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    faults = Faults()
    proxy = _Proxy((host, port), faults)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield S3(f"http://{host}:{port}", f"http://127.0.0.1:{proxy.server_address[1]}", faults)
    finally:
        proxy.shutdown()
        server.stop()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` (and forget cached filesystems and S3 clients), restoring afterwards."""
    from unioncam import storage

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    storage._filesystem.cache_clear()
    storage._s3_client_at.cache_clear()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._filesystem.cache_clear()
        storage._s3_client_at.cache_clear()
