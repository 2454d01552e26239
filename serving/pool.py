"""Triton endpoints behind the gateway: health checks, least-outstanding routing, failover.

`open_stream` returns once the first response (or the end) has arrived, so a request whose
server fails before any token is retried on another server, and the caller knows which
version serves before it sends headers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from exforge.core import tracing
from serving.contract import SPECS

log = logging.getLogger("exforge.serving.pool")


class BackendDown(Exception):
    """No healthy Triton could take the request."""


class ModelError(Exception):
    """Triton answered, but the model (version) failed the request."""


@dataclass
class Endpoint:
    url: str
    client: grpcclient.InferenceServerClient | None = None  # made on the serving loop
    healthy: bool = False
    outstanding: int = 0


@dataclass(frozen=True)
class Delta:
    """One streamed response: its text and what the server said about it (None where
    the model does not return that output)."""

    text: str
    output_tokens: int | None = None
    input_tokens: int | None = None
    reused_blocks: int | None = None
    produced_ns: int | None = None

    @classmethod
    def of(cls, result: grpcclient.InferResult) -> Delta:
        def number(name: str) -> int | None:
            value = result.as_numpy(name)
            return None if value is None else int(value.reshape(-1)[0])

        return cls(
            result.as_numpy("text_output").reshape(-1)[0].decode(errors="replace"),
            number("num_output_tokens"),
            number("num_input_tokens"),
            number("kv_cache_reused_blocks"),
            number("last_token_time_ns"),
        )


@dataclass
class Stream:
    """A generation whose first response has arrived."""

    endpoint: Endpoint
    first: list[Delta]
    rest: AsyncIterator[Delta]
    done: bool = False

    async def aclose(self) -> None:
        await self.rest.aclose()  # type: ignore[attr-defined]


def _inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), SPECS[name].wire_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Pool:
    def __init__(self, urls: list[str], check_interval_s: float = 1.0) -> None:
        self.endpoints = [Endpoint(url) for url in urls]
        self.check_interval_s = check_interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for endpoint in self.endpoints:
            endpoint.client = grpcclient.InferenceServerClient(endpoint.url)
        await self.check()
        self._task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for endpoint in self.endpoints:
            if endpoint.client is not None:
                await endpoint.client.close()

    async def check(self) -> None:
        for endpoint in self.endpoints:
            try:
                ready = endpoint.client.is_server_ready()  # type: ignore[union-attr]
                endpoint.healthy = await asyncio.wait_for(ready, 2)
            except (InferenceServerException, TimeoutError, OSError):
                endpoint.healthy = False

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            await self.check()

    def candidates(self) -> list[Endpoint]:
        """Healthy endpoints, least outstanding requests first."""
        return sorted((e for e in self.endpoints if e.healthy), key=lambda e: e.outstanding)

    async def open_stream(
        self, model: str, version: int, arrays: dict[str, np.ndarray], timeout_s: float
    ) -> Stream:
        """Start a generation on the least-loaded healthy server, failing over while no
        response has arrived. Raises BackendDown or ModelError."""
        tried: set[str] = set()
        while True:
            endpoint = next((e for e in self.candidates() if e.url not in tried), None)
            if endpoint is None:
                raise BackendDown(f"no healthy Triton left (tried {sorted(tried)})")
            tried.add(endpoint.url)
            stream = self._responses(endpoint, model, version, arrays, timeout_s)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return Stream(endpoint, [], stream, done=True)
            except ConnectionError as exc:
                log.warning("Triton %s failed before the first token: %s", endpoint.url, exc)
                endpoint.healthy = False
                continue
            return Stream(endpoint, [first], stream)

    async def _responses(
        self,
        endpoint: Endpoint,
        model: str,
        version: int,
        arrays: dict[str, np.ndarray],
        timeout_s: float,
    ) -> AsyncIterator[Delta]:
        """One delta per generated token. Server loss raises ConnectionError; a
        model error raises ModelError."""

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield {
                "model_name": model,
                "model_version": str(version),
                "inputs": _inputs(arrays),
                "request_id": uuid.uuid4().hex,
                "enable_empty_final_response": True,
            }

        endpoint.outstanding += 1
        span, metadata = tracing.client_span(
            "triton stream_infer", model=model, version=version, endpoint=endpoint.url
        )
        try:
            client = endpoint.client
            assert client is not None, "Pool.start() makes the clients"
            responses = client.stream_infer(requests(), stream_timeout=timeout_s, headers=metadata)
            async for result, error in responses:
                if error is not None:
                    raise ModelError(str(error))
                response = result.get_response()
                if response.outputs:
                    yield Delta.of(result)
                if response.parameters["triton_final_response"].bool_param:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise ConnectionError(exc.details()) from exc
            raise ModelError(exc.details()) from exc
        except InferenceServerException as exc:
            if "unavailable" in str(exc.status()).lower():
                raise ConnectionError(str(exc)) from exc
            raise ModelError(str(exc)) from exc
        finally:
            endpoint.outstanding -= 1
            span.end()
