"""The serving gateway: OpenAI-compatible HTTP (SSE streaming), a WebSocket channel, auth,
rate limits, a bounded queue with deadlines, rollouts, caching, usage and metrics.

All generation goes to Triton over gRPC streaming (serving.pool). `Gateway.generate` is
the one path every endpoint uses; it yields a `Start` (the serving version, known before
any byte is sent), one `Token` per generated token, and an `End`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import Engine

from exforge.core import anomaly
from exforge.core.settings import Settings
from exforge.llm.chat import text_ids, text_tokenizer
from exforge.llm.registry import list_versions
from serving import guard, keys, metrics, rollout, usage
from serving.cache import CachedCompletion, CacheKey, ResponseCache
from serving.contract import LlmRequest
from serving.limits import Admission, RateLimiter, Rejected
from serving.pool import BackendDown, Delta, ModelError, Pool, Stream

log = logging.getLogger("exforge.serving.gateway")
REFRESH_S = 1.0


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error as OpenAI reports it: HTTP status, message, `code`, the `param` at fault
    (and Retry-After for 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


@dataclass(frozen=True)
class Job:
    """One generation: the served model's name, the request in the contract's terms,
    and who asks (`user` keeps a canary split sticky)."""

    model: str
    request: LlmRequest
    user: str | None = None


@dataclass(frozen=True)
class Start:
    version: int


@dataclass(frozen=True)
class Token:
    text: str
    produced_ns: int | None = None  # when the server made it (its clock, Unix ns)


@dataclass(frozen=True)
class End:
    version: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str
    cached: bool  # answered from the gateway's response cache


@dataclass
class Outcome:
    """What one request did, for usage, metrics and the canary judgement."""

    job: Job
    key_id: str
    version: int
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int | None = None  # as the server counted them
    reused_blocks: int = 0


def triton_urls(settings: Settings) -> list[str]:
    if settings.triton_url:
        return [url.strip() for url in settings.triton_url.split(",") if url.strip()]
    return [f"127.0.0.1:{settings.triton_grpc_port}"]


class Gateway:
    def __init__(self, settings: Settings, engine: Engine, urls: list[str] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.pool = Pool(urls or triton_urls(settings))
        self.admission = Admission(settings.gateway_concurrency, settings.gateway_queue)
        self.limiter = RateLimiter(settings.gateway_rate_per_s, settings.gateway_burst)
        self.cache = ResponseCache(settings.gateway_cache_entries)
        self.tokenizer = text_tokenizer()
        self.thresholds = rollout.Thresholds(
            settings.rollback_window_s,
            settings.rollback_min_requests,
            settings.rollback_error_rate,
            settings.rollback_p95_s,
        )
        self.states: dict[str, rollout.RolloutState] = {}
        self.latest: dict[str, int] = {}
        self.created: dict[str, int] = {}
        self.windows: dict[tuple[str, int], rollout.HealthWindow] = {}
        self.keys: dict[str, tuple[float, keys.KeyInfo | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.pool.start()
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pool.close()

    async def _refresh_loop(self) -> None:
        monitor, latency = anomaly.Monitor(self.engine), anomaly.MeanWatch(metrics.LATENCY_METRIC)
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
                changes = await asyncio.to_thread(
                    anomaly.serving_tick, monitor, latency, anomaly.utcnow()
                )
                for change in changes:
                    log.warning("anomaly: %s", change)
            except Exception:
                log.exception("refreshing rollouts failed")

    async def refresh(self) -> None:
        """Re-read rollouts and registry; drop cached answers of models that changed;
        take gradual steps whose canary is healthy."""
        states = await asyncio.to_thread(rollout.all_states, self.engine)
        versions = await asyncio.to_thread(list_versions, self.engine)
        for name, state in states.items():
            old = self.states.get(name)
            if old is not None and (old.stable, old.canary) != (state.stable, state.canary):
                self.cache.invalidate(name)
            metrics.CANARY_PERCENT.labels(name).set(state.percent if state.canary else 0)
        self.states = states
        self.latest = {row["name"]: row["version"] for row in versions}
        for row in reversed(versions):
            self.created[row["name"]] = int(datetime.fromisoformat(row["created_at"]).timestamp())
        for endpoint in self.pool.endpoints:
            metrics.BACKEND_UP.labels(endpoint.url).set(int(endpoint.healthy))
        for state in states.values():
            await self._maybe_step(state)

    async def _maybe_step(self, state: rollout.RolloutState) -> None:
        if state.canary is None or not state.steps:
            return
        waited = time.time() - state.updated_at.timestamp()
        window = self.windows.get((state.name, state.canary))
        if waited < state.step_interval_s or window is None:
            return
        if len(window.samples) >= self.thresholds.min_requests and not window.verdict(
            self.thresholds
        ):
            await asyncio.to_thread(rollout.advance, self.engine, state.name)

    # ------------------------------------------------------------------ admission

    async def authorize(self, secret: str | None, scope: str) -> keys.KeyInfo:
        """The key's holder, if it may use `scope` now. A looked-up key is trusted for
        `gateway_key_ttl_s`, so a revocation takes effect within that time."""
        if not secret:
            raise GatewayError(401, "missing API key (Authorization: Bearer …)", "missing_api_key")
        checked, info = self.keys.get(secret, (0.0, None))
        if time.monotonic() - checked > self.settings.gateway_key_ttl_s:
            info = await asyncio.to_thread(keys.lookup, self.engine, secret)
            self.keys[secret] = (time.monotonic(), info)
        if info is None:
            raise GatewayError(401, "invalid or revoked API key", "invalid_api_key")
        if scope not in info.scopes:
            raise GatewayError(403, f"this API key lacks the {scope!r} scope", "insufficient_scope")
        try:
            self.limiter.check(info.key_id, info.rate_per_s, info.burst)
        except Rejected as exc:
            raise GatewayError(
                429, str(exc), "rate_limit_exceeded", None, exc.retry_after
            ) from None
        return info

    def models(self) -> list[dict[str, object]]:
        names = sorted(set(self.states) | set(self.latest))
        return [
            {
                "id": name,
                "object": "model",
                "created": self.created.get(name, 0),
                "owned_by": "exforge",
                "version": self.route_stable(name),
                "canary": self.states[name].canary if name in self.states else None,
            }
            for name in names
        ]

    def route_stable(self, name: str) -> int:
        if name in self.states:
            return self.states[name].stable
        if name in self.latest:
            return self.latest[name]
        raise GatewayError(404, f"The model `{name}` does not exist", "model_not_found", "model")

    def route(self, job: Job, key_id: str) -> int:
        state = self.states.get(job.model)
        if state is None:
            return self.route_stable(job.model)
        return state.choose(job.user or key_id)

    # ------------------------------------------------------------------ generation

    def prompt_tokens(self, job: Job) -> int:
        """The prompt's tokens as the cpu flavor counts them (`text_input`'s rule)."""
        return len(text_ids(self.tokenizer, job.request.text))

    async def generate(self, job: Job, key: keys.KeyInfo) -> AsyncIterator[Start | Token | End]:
        """The events of one request, generated text redacted when the settings say so.
        A GatewayError before `Start` means nothing was sent; one after it (the deadline,
        a failing server) ends a started stream."""
        prompt_tokens = self.prompt_tokens(job)
        try:
            guard.check_prompt_tokens(prompt_tokens, self.settings.gateway_max_prompt_tokens)
        except guard.InputRejected as exc:
            raise GatewayError(400, str(exc), "prompt_too_long", "messages") from None
        events = self._generate(job, key, prompt_tokens)
        if self.settings.gateway_redact_output:
            events = redacted_events(events)
        async for event in events:
            yield event

    async def _generate(
        self, job: Job, key: keys.KeyInfo, prompt_tokens: int
    ) -> AsyncIterator[Start | Token | End]:
        outcome = Outcome(job, key.key_id, self.route(job, key.key_id), prompt_tokens=prompt_tokens)
        cache_key = self._cache_key(job, outcome.version)
        cached = self.cache.get(cache_key) if cache_key else None
        if cache_key:
            metrics.CACHE.labels("hit" if cached else "miss").inc()
        if cached is not None:
            async for event in self._replay(outcome, cached):
                yield event
            return
        deadline = time.monotonic() + self.settings.gateway_deadline_s
        metrics.QUEUE_DEPTH.set(self.admission.waiting + 1)
        try:
            async with self.admission.slot(self.settings.gateway_deadline_s):
                metrics.QUEUE_DEPTH.set(self.admission.waiting)
                metrics.RUNNING.set(self.admission.running)
                stream = await self._open(outcome, deadline)
                yield Start(outcome.version)
                async for event in self._tokens(outcome, stream, deadline):
                    yield event
        except Rejected as exc:
            self._count(outcome, 429)
            raise GatewayError(
                429, str(exc), "rate_limit_exceeded", None, exc.retry_after
            ) from None
        except TimeoutError:
            self._count(outcome, 504)
            limit = self.settings.gateway_deadline_s
            raise GatewayError(
                504, f"the request outlived the gateway deadline ({limit:g} s)", "timeout"
            ) from None
        finally:
            metrics.RUNNING.set(self.admission.running)
        if cache_key:
            self.cache.put(
                cache_key,
                CachedCompletion(
                    tuple(outcome.tokens), outcome.prompt_tokens, self._completion(outcome)
                ),
            )
        yield await self._finish(outcome, cached=False)

    async def _open(self, outcome: Outcome, deadline: float) -> Stream:
        """Open the stream; a failing canary falls back to the stable version before any
        token, so no client request is lost to it."""
        job = outcome.job
        arrays = job.request.arrays()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                return await self.pool.open_stream(job.model, outcome.version, arrays, remaining)
            except BackendDown as exc:
                self._count(outcome, 503)
                raise GatewayError(503, str(exc), "backend_unavailable") from None
            except ModelError as exc:
                await self._observe(job.model, outcome.version, ok=False, latency=0.0)
                stable = self.route_stable(job.model)
                if outcome.version == stable:
                    self._count(outcome, 502)
                    raise GatewayError(502, f"model error: {exc}", "model_error") from None
                metrics.FAILOVERS.labels("canary_error").inc()
                outcome.version = stable

    async def _tokens(
        self, outcome: Outcome, stream: Stream, deadline: float
    ) -> AsyncIterator[Token]:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                for delta in stream.first:
                    yield self._token(outcome, delta)
                if not stream.done:
                    async for delta in stream.rest:
                        yield self._token(outcome, delta)
        except (ModelError, ConnectionError) as exc:
            await self._observe(outcome.job.model, outcome.version, ok=False, latency=0.0)
            self._count(outcome, 502)
            raise GatewayError(502, f"model error: {exc}", "model_error") from None
        finally:
            await stream.aclose()

    def _token(self, outcome: Outcome, delta: Delta) -> Token:
        if outcome.first_token is None:
            outcome.first_token = time.monotonic()
            metrics.TTFT.labels(outcome.job.model, outcome.version).observe(
                outcome.first_token - outcome.started
            )
        outcome.tokens.append(delta.text)
        outcome.prompt_tokens = delta.input_tokens or outcome.prompt_tokens
        outcome.output_tokens = delta.output_tokens
        outcome.reused_blocks = delta.reused_blocks or outcome.reused_blocks
        return Token(delta.text, delta.produced_ns)

    async def _replay(
        self, outcome: Outcome, cached: CachedCompletion
    ) -> AsyncIterator[Start | Token | End]:
        yield Start(outcome.version)
        for text in cached.deltas:
            yield self._token(outcome, Delta(text))
        outcome.prompt_tokens = cached.prompt_tokens
        outcome.output_tokens = cached.completion_tokens
        yield await self._finish(outcome, cached=True)

    async def _finish(self, outcome: Outcome, cached: bool) -> End:
        job, version = outcome.job, outcome.version
        latency = time.monotonic() - outcome.started
        completion = self._completion(outcome)
        await asyncio.to_thread(
            usage.record,
            self.engine,
            outcome.key_id,
            job.model,
            version,
            outcome.prompt_tokens,
            completion,
        )
        metrics.TOKENS.labels(job.model, version, "prompt").inc(outcome.prompt_tokens)
        metrics.TOKENS.labels(job.model, version, "completion").inc(completion)
        metrics.LATENCY.labels(job.model, version).observe(latency)
        self._count(outcome, 200)
        if not cached:
            await self._observe(job.model, version, ok=True, latency=latency)
        reason = "length" if completion >= job.request.max_tokens else "stop"
        reused = outcome.reused_blocks * self.settings.gateway_kv_block_tokens
        return End(version, outcome.prompt_tokens, completion, reused, reason, cached)

    @staticmethod
    def _completion(outcome: Outcome) -> int:
        """Completion tokens: the server's count, else one per response."""
        return len(outcome.tokens) if outcome.output_tokens is None else outcome.output_tokens

    def _cache_key(self, job: Job, version: int) -> CacheKey | None:
        if job.request.temperature > 0 or not self.settings.gateway_cache_entries:
            return None
        return CacheKey(job.model, version, job.request)

    def _count(self, outcome: Outcome, status: int) -> None:
        metrics.REQUESTS.labels(outcome.job.model, outcome.version, status).inc()

    async def _observe(self, model: str, version: int, ok: bool, latency: float) -> None:
        """Judge canaries: roll back automatically when one passes a threshold."""
        window = self.windows.setdefault(
            (model, version), rollout.HealthWindow(self.thresholds.window_s)
        )
        window.add(ok, latency)
        state = self.states.get(model)
        if state is None or state.canary != version:
            return
        reason = window.verdict(self.thresholds)
        if reason is None:
            return
        log.warning("rolling back %s v%d: %s", model, version, reason)
        self.states[model] = replace(state, canary=None, percent=0.0)  # stop routing to it now
        self.states[model] = await asyncio.to_thread(
            rollout.rollback, self.engine, model, f"automatic: {reason}", version
        )
        self.cache.invalidate(model)
        self.windows.pop((model, version), None)
        metrics.ROLLBACKS.labels(model).inc()


async def redacted_events(
    events: AsyncIterator[Start | Token | End],
) -> AsyncIterator[Start | Token | End]:
    """Token texts through the output redaction (released at whitespace); what is still
    held when the generation ends goes out, redacted, before its `End`."""
    redactor = guard.OutputRedactor()
    async for event in events:
        if isinstance(event, Token):
            text = redactor.feed(event.text)
            if text:
                yield Token(text, event.produced_ns)
            continue
        if isinstance(event, End):
            rest = redactor.finish()
            if rest:
                yield Token(rest)
        yield event


async def collect(events: AsyncIterator[Start | Token | End]) -> tuple[str, End]:
    """Run a generation to its end: the whole text and the closing event."""
    text = []
    end = None
    async for event in events:
        if isinstance(event, Token):
            text.append(event.text)
        elif isinstance(event, End):
            end = event
    assert end is not None
    return "".join(text), end


async def first_event(events: AsyncIterator[Start | Token | End]) -> Start:
    """Advance to `Start` (errors surface here, before any byte goes out)."""
    event = await anext(events)
    assert isinstance(event, Start)
    return event
