"""A threaded HTTP server on a free 127.0.0.1 port, run in the background of a test.

Like the services it stands for (GitHub's API, CDNs in front of registries), it
compresses every body whenever the request's `Accept-Encoding` allows it: `zstd`, `br`,
`gzip` or `deflate`, chosen by the server's preference among those the client accepts
with a q-value above 0, and says so in `Content-Encoding` and `Vary`. `serve(...,
encodings=())` turns compression off.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import brotli
import zstandard

# The codings a test server can apply, in the order it prefers them.
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda body: zstandard.ZstdCompressor().compress(body),
    "br": brotli.compress,
    "gzip": lambda body: gzip.compress(body, mtime=0),
    "deflate": zlib.compress,  # HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2)
}


def accepted(header: str) -> dict[str, float]:
    """`Accept-Encoding` as coding → q-value (RFC 9110 12.5.3)."""
    codings: dict[str, float] = {}
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if not name:
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        codings[name.strip().lower()] = quality
    return codings


def choose_coding(header: str | None, offered: tuple[str, ...]) -> str | None:
    """The first of `offered` that the client accepts, None for the identity."""
    codings = accepted(header or "")
    for coding in offered:
        if codings.get(coding, codings.get("*", 0.0)) > 0:
            return coding
    return None


class Handler(BaseHTTPRequestHandler):
    """Base handler: quiet logs and small reply helpers; `server.state` is the model."""

    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> Any:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Send a reply, its body compressed when the client accepts a coding the server
        offers (a HEAD gets the headers the GET would have)."""
        headers = dict(headers or {})
        offered: tuple[str, ...] = self.server.encodings  # type: ignore[attr-defined]
        coding = choose_coding(self.headers.get("accept-encoding"), offered) if body else None
        if coding is not None:
            body = COMPRESSORS[coding](body)
            headers["content-encoding"] = coding
        if offered:
            headers["vary"] = "Accept-Encoding"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.reply(status, body, {"content-type": "application/json", **(headers or {})})

    def redirect(self, location: str, status: int = 302) -> None:
        self.reply(status, b"", {"location": location})

    def read_json(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")


@contextmanager
def serve(
    handler: type[Handler], state: Any, encodings: tuple[str, ...] = tuple(COMPRESSORS)
) -> Iterator[str]:
    """Serve `state` with `handler` until the block ends, compressing with `encodings`
    (none: never); yields the base URL."""
    unknown = set(encodings) - set(COMPRESSORS)
    assert not unknown, f"no compressor for {unknown}"
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    server.encodings = encodings  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
