"""What the gateway lets in and out: request size and shape limits with clear 400s, and
secret redaction of generated text before it leaves.

Input: a body over `gateway_max_body_bytes` or JSON nested deeper than
`gateway_max_json_depth` is refused before it is parsed (`BodyLimits`, an ASGI
middleware); a chat over `gateway_max_messages` messages or a prompt over
`gateway_max_prompt_tokens` Tekken tokens is refused before it is queued.

Output: with `gateway_redact_output` (on by default) generated text goes through the same
redaction as training data (`exforge.elixir.redact`): keys, tokens, e-mail addresses and
public IP addresses become placeholders. A stream is released up to its last whitespace
(keys, addresses and tokens hold none); a line that names a secret (`api_key: "`) is held
until it ends, and a private-key block until its END line, so a secret split across
tokens is still caught.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from exforge.elixir.redact import redact

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# a name that binds a secret (`api_key: "…"`, `token =`): its line is released whole
SECRET_NAME = re.compile(
    r"(?i)(?:secret|token|passw(?:or)?d|pwd|api_?key|access_?key|private_?key|auth_?key"
    r"|credential|salt)\w*[\"']?\s*(?::|=>|=|,)"
)
KEY_BLOCK_START = "-----BEGIN"
KEY_BLOCK_END = "-----END"


class InputRejected(ValueError):
    """A request over a limit; the message names the limit and its setting."""


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), without
    parsing it: a linear scan that stays cheap on hostile input."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _error(status: int, message: str) -> tuple[dict[str, Any], bytes]:
    error = {"message": message, "type": "invalid_request_error", "code": status}
    body = json.dumps({"error": error}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, body


@dataclass
class BodyLimits:
    """ASGI middleware: refuse request bodies over `max_bytes` or nested deeper than
    `max_depth` with a 400 naming the limit; pass the others on unchanged."""

    app: ASGIApp
    max_bytes: int
    max_depth: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except InputRejected as exc:
            start, payload = _error(400, str(exc))
            await send(start)
            await send({"type": "http.response.body", "body": payload})
            return
        delivered = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise InputRejected(self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise InputRejected(self._too_large(size))
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        depth = json_depth(body)
        if depth > self.max_depth:
            raise InputRejected(
                f"request JSON is nested {depth} deep; the limit is {self.max_depth} "
                "(EXFORGE_GATEWAY_MAX_JSON_DEPTH)"
            )
        return body

    def _too_large(self, size: int) -> str:
        return (
            f"request body has {size} bytes; the limit is {self.max_bytes} "
            "(EXFORGE_GATEWAY_MAX_BODY_BYTES)"
        )


def check_messages(count: int, limit: int) -> None:
    if count > limit:
        raise InputRejected(
            f"the chat has {count} messages; the limit is {limit} (EXFORGE_GATEWAY_MAX_MESSAGES)"
        )


def check_prompt_tokens(count: int, limit: int) -> None:
    if count > limit:
        raise InputRejected(
            f"the prompt has {count} tokens; the limit is {limit} "
            "(EXFORGE_GATEWAY_MAX_PROMPT_TOKENS)"
        )


@dataclass
class OutputRedactor:
    """Redacts a stream of text deltas: complete lines go out redacted, the rest waits."""

    pending: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def _release(self, text: str) -> str:
        result = redact(text)
        for kind, count in result.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        return result.text

    def feed(self, delta: str) -> str:
        """The redacted text that can go out now (possibly empty)."""
        self.pending += delta
        cut = max(self.pending.rfind(c) for c in " \t\n") + 1
        line = self.pending.rfind("\n", 0, cut) + 1
        if cut and SECRET_NAME.search(self.pending[line:cut].rstrip()):
            cut = line  # a secret's name: hold its line until the value is complete
        block = self.pending.rfind(KEY_BLOCK_START, 0, cut)
        if block != -1 and self.pending.find(KEY_BLOCK_END, block) == -1:
            cut = self.pending.rfind("\n", 0, block) + 1  # hold the whole unfinished block
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return self._release(ready) if ready else ""

    def finish(self) -> str:
        """Everything still held, redacted (the stream ended)."""
        rest, self.pending = self.pending, ""
        return self._release(rest) if rest else ""
