"""FastAPI routes of the gateway, shaped as OpenAI's API: /v1/completions,
/v1/chat/completions (JSON or SSE), /v1/models, the /v1/channel WebSocket, /health and
/metrics.

Chat messages become prompt ids with mistral-common (`exforge.llm.chat`, the encoding the
trainer uses) and travel to Triton as `text_input` (`chat.prompt_text`). Errors carry
OpenAI's body `{"error": {"message", "type", "param", "code"}}`; unknown request fields
are ignored, as OpenAI does. Every response names the version that served it: header
`x-exforge-model-version`, field `model_version` and `system_fingerprint` `NAME-vN`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mistral_common.exceptions import MistralCommonException
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError

from exforge.core import tracing
from exforge.llm.chat import load_tokenizer, prompt_ids, prompt_text
from serving import guard
from serving.contract import LlmRequest
from serving.gateway import End, Gateway, GatewayError, Job, Start, Token, collect, first_event
from serving.keys import KeyInfo

VERSION_HEADER = "x-exforge-model-version"
ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """The fields completions and chat completions share."""

    default_max_tokens: ClassVar[int] = 16
    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def text(self) -> str:
        """The prompt as Triton's `text_input`."""
        raise NotImplementedError

    def job(self) -> Job:
        if self.n != 1:
            raise GatewayError(400, "only n=1 is supported", "unsupported_value", "n")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        request = LlmRequest(
            self.text(),
            self.max_completion_tokens or self.max_tokens or self.default_max_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            tuple(stop),
            self.seed or 0,
        )
        return Job(self.model, request, self.user)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(Sampled):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1:
            return self.prompt[0]
        raise GatewayError(400, "one prompt per request", "unsupported_value", "prompt")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(Sampled):
    default_max_tokens: ClassVar[int] = 256
    messages: list[Message] = Field(min_length=1)

    def text(self) -> str:
        """The conversation as the trainer encodes it (mistral-common), as `text_input`."""
        turns = [{"from": ROLES[m.role], "value": m.text()} for m in self.messages]
        try:
            ids = prompt_ids(turns)
        except MistralCommonException as exc:
            raise GatewayError(400, str(exc), "invalid_messages", "messages") from None
        return prompt_text(load_tokenizer(generation=True).instruct_tokenizer.tokenizer, ids)


class Shape:
    """OpenAI's object shapes for text completions and chat completions."""

    def __init__(self, chat: bool, model: str, version: int, include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.version = version
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _base(self, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        base = {
            "id": self.id,
            "object": f"{kind}.chunk" if streaming and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "model_version": self.version,
            "system_fingerprint": f"{self.model}-v{self.version}",
        }
        if streaming and self.include_usage:
            base["usage"] = None
        return base

    def _choice(self, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        text = delta.get("content", "")
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def opening(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        if not self.chat:
            return None
        return self._base(True) | {
            "choices": [self._choice({"role": "assistant", "content": ""}, None)]
        }

    def chunk(self, token: Token) -> dict[str, Any]:
        chunk = self._base(True) | {"choices": [self._choice({"content": token.text}, None)]}
        if token.produced_ns is not None:
            chunk["produced_ns"] = token.produced_ns  # when the server made this token
        return chunk

    def closing(self, end: End) -> list[dict[str, Any]]:
        """The last choice chunk (finish reason), then usage alone when asked for."""
        chunks = [self._base(True) | {"choices": [self._choice({}, end.finish_reason)]}]
        if self.include_usage:
            chunks.append(self._base(True) | {"choices": [], "usage": usage(end)})
        return chunks

    def whole(self, text: str, end: End) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": end.finish_reason}
        else:
            choice = self._choice({"content": text}, end.finish_reason)
        return self._base(False) | {"choices": [choice], "usage": usage(end)}


def usage(end: End) -> dict[str, Any]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": end.cached_tokens},
    }


def bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return value


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def validation_error(exc: RequestValidationError | ValidationError) -> GatewayError:
    """Pydantic's first complaint as OpenAI's 400, `param` in OpenAI's notation."""
    first = exc.errors()[0]
    path = [p for p in first.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    where = f"{param}: " if param else ""
    return GatewayError(
        400, f"{where}{first.get('msg', 'invalid request')}", "invalid_value", param or None
    )


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


async def serve(gateway: Gateway, request: Request, body: Sampled, chat: bool) -> Response:
    """The one request path of both HTTP endpoints: authorise, generate, shape."""
    try:
        key = await gateway.authorize(bearer(request.headers.get("authorization")), "generate")
        job = body.job()
        events = gateway.generate(job, key)
        start = await first_event(events)
    except GatewayError as exc:
        return error_response(exc)
    shape = Shape(chat, job.model, start.version, body.include_usage)
    headers = {VERSION_HEADER: str(start.version)}
    if not body.stream:
        try:
            text, end = await collect(events)
        except GatewayError as exc:
            return error_response(exc)
        return JSONResponse(shape.whole(text, end), headers=headers)

    async def stream() -> AsyncIterator[bytes]:
        opening = shape.opening()
        if opening:
            yield sse(opening)
        try:
            async for event in events:
                if isinstance(event, Token):  # one chunk per token, even an empty one
                    yield sse(shape.chunk(event))
                elif isinstance(event, End):
                    for chunk in shape.closing(event):
                        yield sse(chunk)
        except GatewayError as exc:  # after the headers: tell the client in-band
            yield sse(exc.body(), event="error")
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


class Channel:
    """The /v1/channel WebSocket: `join {model, api_key?}` · `generate {id, prompt, …}` →
    start/token/done/error events · `cancel {id}`. The key comes in the Authorization
    header or the join message (never the URL); it is checked again on every generate,
    so a revoked key stops working while the socket stays open."""

    def __init__(self, gateway: Gateway, socket: WebSocket) -> None:
        self.gateway = gateway
        self.socket = socket
        self.secret = bearer(socket.headers.get("authorization"))
        self.model: str | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self.lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.socket.send_json(message)

    async def run(self) -> None:
        await self.socket.accept()
        try:
            while True:
                message = await self.socket.receive_json()
                await self.handle(message)
        except GatewayError as exc:
            await self.send({"type": "error"} | exc.body())
            await self.socket.close(code=4000 + exc.status, reason=str(exc)[:120])
        except WebSocketDisconnect:
            pass
        finally:
            for task in self.running.values():
                task.cancel()

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "join":
            self.secret = self.secret or message.get("api_key")
            await self.gateway.authorize(self.secret, "generate")
            self.model = str(message["model"])
            version = self.gateway.route_stable(self.model)
            await self.send({"type": "joined", "model": self.model, "model_version": version})
        elif kind == "generate" and self.model is not None:
            key = await self.gateway.authorize(self.secret, "generate")
            gen_id = str(message.get("id") or uuid.uuid4().hex)
            fields = {k: v for k, v in message.items() if k not in ("type", "id", "model")}
            try:
                job = CompletionBody(model=self.model, **fields).job()
            except ValidationError as exc:
                await self.send({"type": "error", "id": gen_id} | validation_error(exc).body())
                return
            except GatewayError as exc:
                await self.send({"type": "error", "id": gen_id} | exc.body())
                return
            self.running[gen_id] = asyncio.create_task(self.generate(gen_id, job, key))
        elif kind == "cancel" and message.get("id") in self.running:
            self.running[message["id"]].cancel()
        else:
            await self.send({"type": "error", "message": f"unexpected {kind!r} (join first)"})

    async def generate(self, gen_id: str, job: Job, key: KeyInfo) -> None:
        try:
            async for event in self.gateway.generate(job, key):
                if isinstance(event, Start):
                    await self.send({"type": "start", "id": gen_id, "model_version": event.version})
                elif isinstance(event, Token):
                    await self.send(
                        {"type": "token", "id": gen_id, "text": event.text}
                        | ({"produced_ns": event.produced_ns} if event.produced_ns else {})
                    )
                else:
                    await self.send(
                        {
                            "type": "done",
                            "id": gen_id,
                            "model_version": event.version,
                            "finish_reason": event.finish_reason,
                            "usage": usage(event),
                        }
                    )
        except asyncio.CancelledError:
            await self.send({"type": "cancelled", "id": gen_id})
        except GatewayError as exc:
            await self.send({"type": "error", "id": gen_id} | exc.body())
        finally:
            self.running.pop(gen_id, None)


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    app = FastAPI(title="exforge gateway", lifespan=lifespan)
    limits = gateway.settings
    app.add_middleware(
        guard.BodyLimits,
        max_bytes=limits.gateway_max_body_bytes,
        max_depth=limits.gateway_max_json_depth,
    )

    @app.middleware("http")
    async def traced(request: Request, call_next: Any) -> Response:
        """A server span per request, continuing the client's traceparent if it sent one;
        the Triton call of a generation is its child (gRPC metadata carries it on)."""
        name = f"{request.method} {request.url.path}"
        with tracing.consumed(
            name, request.headers, {"http.route": request.url.path}, SpanKind.SERVER
        ):
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(GatewayError)
    async def refused(_: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await serve(gateway, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        try:
            guard.check_messages(len(body.messages), gateway.settings.gateway_max_messages)
        except guard.InputRejected as exc:
            return error_response(GatewayError(400, str(exc), "too_many_messages", "messages"))
        return await serve(gateway, request, body, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        await gateway.authorize(bearer(request.headers.get("authorization")), "models")
        return JSONResponse({"object": "list", "data": gateway.models()})

    @app.websocket("/v1/channel")
    async def websocket(socket: WebSocket) -> None:
        await Channel(gateway, socket).run()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"backends": {e.url: e.healthy for e in gateway.pool.endpoints}}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
