"""FastAPI routes of the gateway: /v1/completions, /v1/chat/completions (JSON or SSE),
/v1/models, the /v1/channel WebSocket, /health and /metrics.

Every response names the version that served it: header `x-exforge-model-version` and
field `model_version` (and `system_fingerprint` `NAME-vN`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from exforge.core import tracing
from serving import guard
from serving.gateway import End, Gateway, GatewayError, Job, Start, Token, collect, first_event

VERSION_HEADER = "x-exforge-model-version"


class CompletionBody(BaseModel):
    model: str
    prompt: str
    max_tokens: int = Field(16, gt=0, le=4096)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = None
    seed: int = Field(0, ge=0)
    stream: bool = False
    user: str | None = None

    def job(self, prompt: str | None = None) -> Job:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Job(
            self.model,
            self.prompt if prompt is None else prompt,
            self.max_tokens,
            self.temperature,
            self.top_p,
            tuple(stop),
            self.seed,
            self.user,
        )


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(CompletionBody):
    prompt: str = ""
    messages: list[Message]


def render_chat(messages: list[Message]) -> str:
    """Mistral's instruct format as text (the system prompt leads the first user turn)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts = []
    for message in messages:
        if message.role == "user":
            content = f"{system}\n\n{message.content}" if system else message.content
            system = ""
            parts.append(f"[INST]{content}[/INST]")
        elif message.role == "assistant":
            parts.append(f"{message.content}</s>")
    return "".join(parts)


class Shape:
    """OpenAI's object shapes for text completions and chat completions."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _base(self, version: int, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if streaming and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "model_version": version,
            "system_fingerprint": f"{self.model}-v{version}",
        }

    def _choice(self, text: str | None, finish: str | None, streaming: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if streaming:
            return {
                "index": 0,
                "delta": {} if text is None else {"content": text},
                "finish_reason": finish,
            }
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }

    def chunk(self, version: int, text: str) -> dict[str, Any]:
        return self._base(version, True) | {"choices": [self._choice(text, None, True)]}

    def last_chunk(self, end: End) -> dict[str, Any]:
        return self._base(end.version, True) | {
            "choices": [self._choice(None, end.finish_reason, True)],
            "usage": usage(end),
        }

    def whole(self, text: str, end: End) -> dict[str, Any]:
        return self._base(end.version, False) | {
            "choices": [self._choice(text, end.finish_reason, False)],
            "usage": usage(end),
        }


def usage(end: End) -> dict[str, Any]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
        "cached": end.cached,
    }


def bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return value


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    body = {"error": {"message": str(exc), "type": "gateway_error", "code": exc.status}}
    return JSONResponse(body, status_code=exc.status, headers=headers)


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def serve(gateway: Gateway, request: Request, job: Job, chat: bool, stream: bool) -> Response:
    try:
        key = await gateway.authorize(bearer(request.headers.get("authorization")), "generate")
        events = gateway.generate(job, key)
        start = await first_event(events)
    except GatewayError as exc:
        return error_response(exc)
    shape = Shape(chat, job.model)
    headers = {VERSION_HEADER: str(start.version)}
    if not stream:
        text, end = await collect(events)
        return JSONResponse(shape.whole(text, end), headers=headers)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                if isinstance(event, Token):  # one chunk per token, even an empty one
                    yield sse(shape.chunk(start.version, event.text))
                elif isinstance(event, End):
                    yield sse(shape.last_chunk(event))
        except Exception as exc:  # after the first token: tell the client in-band
            yield sse({"error": {"message": f"{type(exc).__name__}: {exc}"}})
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def channel(gateway: Gateway, socket: WebSocket) -> None:
    """join {model} · generate {id, prompt, …} → token/done/error events · cancel {id}."""
    secret = bearer(socket.headers.get("authorization")) or socket.query_params.get("api_key")
    await socket.accept()
    try:
        key = await gateway.authorize(secret, "generate")
    except GatewayError as exc:
        await socket.close(code=4000 + exc.status, reason=str(exc))
        return
    model: str | None = None
    running: dict[str, asyncio.Task[None]] = {}
    lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            await socket.send_json(message)

    async def run(gen_id: str, job: Job) -> None:
        try:
            async for event in gateway.generate(job, key):
                if isinstance(event, Start):
                    await send({"type": "start", "id": gen_id, "model_version": event.version})
                elif isinstance(event, Token):
                    await send({"type": "token", "id": gen_id, "text": event.text})
                else:
                    await send(
                        {
                            "type": "done",
                            "id": gen_id,
                            "model_version": event.version,
                            "finish_reason": event.finish_reason,
                            "usage": usage(event),
                        }
                    )
        except asyncio.CancelledError:
            await send({"type": "cancelled", "id": gen_id})
        except GatewayError as exc:
            await send({"type": "error", "id": gen_id, "status": exc.status, "message": str(exc)})
        finally:
            running.pop(gen_id, None)

    try:
        while True:
            message = await socket.receive_json()
            kind = message.get("type")
            if kind == "join":
                model = message["model"]
                await send(
                    {"type": "joined", "model": model, "model_version": gateway.route_stable(model)}
                )
            elif kind == "generate" and model is not None:
                gen_id = str(message.get("id") or uuid.uuid4().hex)
                body = CompletionBody(
                    model=model,
                    **{k: v for k, v in message.items() if k not in ("type", "id", "model")},
                )
                running[gen_id] = asyncio.create_task(run(gen_id, body.job()))
            elif kind == "cancel" and message.get("id") in running:
                running[message["id"]].cancel()
            else:
                await send({"type": "error", "message": f"unexpected {kind!r} (join first)"})
    except (WebSocketDisconnect, GatewayError):
        for task in running.values():
            task.cancel()


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

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await serve(gateway, request, body.job(), chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        try:
            guard.check_messages(len(body.messages), gateway.settings.gateway_max_messages)
        except guard.InputRejected as exc:
            return error_response(GatewayError(400, str(exc)))
        job = body.job(render_chat(body.messages))
        return await serve(gateway, request, job, chat=True, stream=body.stream)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            await gateway.authorize(bearer(request.headers.get("authorization")), "models")
        except GatewayError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": gateway.models()})

    @app.websocket("/v1/channel")
    async def websocket(socket: WebSocket) -> None:
        await channel(gateway, socket)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"backends": {e.url: e.healthy for e in gateway.pool.endpoints}}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
