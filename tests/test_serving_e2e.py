"""Serving end to end, all real: exported versions on two tritonservers (python backend),
tritonclient gRPC streaming, the gateway over HTTP/SSE and WebSocket, rollouts, failover.

Tests run in file order and share the servers; the last one kills a Triton.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import websockets
from sqlalchemy import Engine

from exforge.core.db import open_database
from exforge.core.settings import Settings, load_settings
from exforge.core.store import open_store
from exforge.llm.registry import get_version
from serving import rollout, triton
from serving.contract import INPUTS, request_arrays
from serving.export import export
from serving.keys import create_key
from serving.usage import report
from tests.conftest import free_port
from tests.support.serving import MODEL, RunningGateway, register_versions, run_gateway

WIRE = {spec.name: spec.wire_type for spec in INPUTS}


@dataclass
class Served:
    settings: Settings
    engine: Engine
    a: triton.Instance
    b: triton.Instance


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Versions 1-3 registered and exported; Triton A serves 1 and 2, Triton B serves 1;
    version 3 is exported but never loaded (it fails every request)."""
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("serving"),
        rollback_min_requests=5,
        rollback_error_rate=0.2,
        gateway_concurrency=8,
        # these tests count streamed tokens one by one; the output redaction (on by
        # default, released at whitespace) is tested in tests/test_gateway_guard.py
        gateway_redact_output=False,
    )
    store, engine = open_store(settings), open_database(settings)
    register_versions(settings, store, engine, 3)
    for version in (1, 2, 3):
        export(settings, store, engine, MODEL, version, "cpu")
    repo = settings.root / "triton" / "cpu"
    a = triton.Instance("triton-a", free_port(), free_port(), free_port())
    b = triton.Instance("triton-b", free_port(), free_port(), free_port())
    try:
        for instance, versions in ((a, [1, 2]), (b, [1])):
            triton.start(settings, instance, repo)
            triton.load(instance, MODEL, versions)
        rollout.promote(engine, MODEL, 1)
        yield Served(settings, engine, a, b)
    finally:
        for instance in (a, b):
            triton.stop(settings, instance)


@pytest.fixture
def gateway_a(served: Served) -> Iterator[RunningGateway]:
    with run_gateway(served.settings, served.engine, [served.a.grpc_url], free_port()) as gw:
        yield gw


def grpc_stream(url: str, version: int, prompt: str, max_tokens: int) -> list[tuple[float, str]]:
    """Stream one request with plain tritonclient; (arrival time, text) per response."""
    client = grpcclient.InferenceServerClient(url)
    arrivals: queue.Queue[tuple[object, object, float]] = queue.Queue()
    client.start_stream(callback=lambda result, error: arrivals.put((result, error, time.time())))
    inputs = []
    for name, array in request_arrays(prompt, max_tokens, 0.0, 1.0, [], True, 0).items():
        tensor = grpcclient.InferInput(name, list(array.shape), WIRE[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.async_stream_infer(
        MODEL, inputs, model_version=str(version), enable_empty_final_response=True
    )
    tokens = []
    while True:
        result, error, at = arrivals.get(timeout=60)
        assert error is None, error
        response = result.get_response()
        if response.outputs:
            tokens.append((at, result.as_numpy("text_output").reshape(-1)[0].decode()))
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return tokens


def test_export_writes_versions_and_cards(served: Served) -> None:
    from serving.modelconfig import parse

    model_dir = served.settings.root / "triton" / "cpu" / MODEL
    config = parse((model_dir / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [1, 2, 3]
    assert config.model_transaction_policy.decoupled
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    card = json.loads((model_dir / "2" / "card.json").read_text())
    assert card["base_model"] == "tiny" and card["adapter"].endswith("run2/adapter.safetensors")
    store = open_store(served.settings)
    assert store.exists(f"triton/cpu/{MODEL}/2/model.py")
    assert store.exists(f"triton/cpu/{MODEL}/config.pbtxt")


def test_triton_streams_tokens_over_grpc(served: Served) -> None:
    one = grpc_stream(served.a.grpc_url, 1, "defmodule Stack do", 12)
    two = grpc_stream(served.a.grpc_url, 2, "defmodule Stack do", 12)
    assert len(one) == len(two) == 12  # one response per token
    times = [at for at, _ in one]
    assert times == sorted(times) and times[-1] > times[0]  # incremental, not one burst
    assert "".join(t for _, t in one) != "".join(t for _, t in two)  # different versions
    states = {(m["version"], m["state"]) for m in triton.index(served.a)}
    assert {("1", "READY"), ("2", "READY")} <= states


def sse_events(response: httpx.Response) -> Iterator[dict[str, object] | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            yield payload if payload == "[DONE]" else json.loads(payload)


def test_gateway_streams_sse(gateway_a: RunningGateway) -> None:
    body = {"model": MODEL, "prompt": "defmodule Stack do", "max_tokens": 10, "stream": True}
    with httpx.stream(
        "POST", f"{gateway_a.url}/v1/completions", json=body, headers=gateway_a.headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-exforge-model-version"] == "1"
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"][0]["text"] != ""]
    assert len(chunks) >= 5 and all(e["model_version"] == 1 for e in events[:-1])
    assert events[-2]["usage"]["completion_tokens"] == 10

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answer = httpx.post(
        f"{gateway_a.url}/v1/chat/completions", json=chat, headers=gateway_a.headers
    ).json()
    assert answer["object"] == "chat.completion" and answer["model_version"] == 1
    assert answer["usage"]["completion_tokens"] == 4
    listed = httpx.get(f"{gateway_a.url}/v1/models", headers=gateway_a.headers).json()
    assert listed["data"][0]["id"] == MODEL


def test_websocket_channel_streams_and_cancels(gateway_a: RunningGateway) -> None:
    async def session() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        url = gateway_a.url.replace("http", "ws") + f"/v1/channel?api_key={gateway_a.key}"
        async with websockets.connect(url) as socket:
            await socket.send(json.dumps({"type": "join", "model": MODEL}))
            assert json.loads(await socket.recv())["type"] == "joined"
            await socket.send(
                json.dumps({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 6})
            )
            complete = await until(socket, "done")
            await socket.send(
                json.dumps({"type": "generate", "id": "b", "prompt": "y", "max_tokens": 400})
            )
            started = await until(socket, "token")
            await socket.send(json.dumps({"type": "cancel", "id": "b"}))
            cancelled = started + await until(socket, "cancelled")
            return complete, cancelled

    async def until(socket: object, kind: str) -> list[dict[str, object]]:
        events = []
        while not events or events[-1]["type"] != kind:
            events.append(json.loads(await socket.recv()))  # type: ignore[attr-defined]
        return events

    complete, cancelled = asyncio.run(session())
    assert complete[0]["type"] == "start" and complete[0]["model_version"] == 1
    assert [e["type"] for e in complete].count("token") == 6
    assert complete[-1]["usage"]["completion_tokens"] == 6
    assert cancelled[-1] == {"type": "cancelled", "id": "b"}
    assert [e["type"] for e in cancelled].count("token") < 400


def test_auth_scopes_rate_limit_and_usage(served: Served, gateway_a: RunningGateway) -> None:
    url = f"{gateway_a.url}/v1/completions"
    body = {"model": MODEL, "prompt": "usage", "max_tokens": 3, "temperature": 0.7}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    _, reader = create_key(served.engine, "reader", ["models"])
    assert httpx.post(url, json=body, headers=bearer(reader)).status_code == 403
    key_id, limited = create_key(served.engine, "limited", ["generate"], rate_per_s=0.01, burst=3)
    statuses = [httpx.post(url, json=body | {"seed": i}, headers=bearer(limited)) for i in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["Retry-After"]) >= 1
    served_tokens = sum(r.json()["usage"]["completion_tokens"] for r in statuses[:3])
    rows = [row for row in report(served.engine) if row["key_id"] == key_id]
    assert sum(row["completion_tokens"] for row in rows) == served_tokens == 9
    assert sum(row["requests"] for row in rows) == 3


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_queue_full_answers_429(served: Served) -> None:
    settings = served.settings.model_copy(update={"gateway_concurrency": 1, "gateway_queue": 0})
    with run_gateway(settings, served.engine, [served.a.grpc_url], free_port()) as gw:
        url = f"{gw.url}/v1/completions"
        long = {
            "model": MODEL,
            "prompt": "a",
            "max_tokens": 3000,
            "stream": True,
            "temperature": 0.7,
        }  # sampled: never answered from the cache
        with httpx.stream("POST", url, json=long, headers=gw.headers) as first:
            events = sse_events(first)  # kept: dropping it would close the stream
            assert "choices" in next(events)  # generating: the only slot is taken
            second = httpx.post(url, json=long | {"stream": False}, headers=gw.headers, timeout=60)
        assert second.status_code == 429, second.text[:300]
        assert int(second.headers["Retry-After"]) >= 1


def test_deadline_answers_504(served: Served) -> None:
    settings = served.settings.model_copy(update={"gateway_deadline_s": 0.2})
    with run_gateway(settings, served.engine, [served.a.grpc_url], free_port()) as gw:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": True}
        with httpx.stream(
            "POST", f"{gw.url}/v1/completions", json=body, headers=gw.headers
        ) as response:
            events = list(sse_events(response))
    assert "deadline" in json.dumps(events[-2]) or "Timeout" in json.dumps(events[-2])


async def complete_many(
    gw: RunningGateway, bodies: list[dict[str, object]], parallel: int = 8
) -> list[httpx.Response]:
    limits = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(timeout=120, headers=gw.headers) as client:

        async def one(body: dict[str, object]) -> httpx.Response:
            async with limits:
                return await client.post(f"{gw.url}/v1/completions", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_canary_split_90_10(served: Served, gateway_a: RunningGateway) -> None:
    rollout.promote(served.engine, MODEL, 1)
    rollout.split(served.engine, MODEL, 2, 10.0, sticky=True)
    asyncio.run(gateway_a.gateway.refresh())
    bodies = [
        {"model": MODEL, "prompt": "split", "max_tokens": 1, "user": f"user-{i}", "seed": i}
        for i in range(1000)
    ]
    responses = asyncio.run(complete_many(gateway_a, bodies))
    assert all(r.status_code == 200 for r in responses)
    versions = [int(r.headers["x-exforge-model-version"]) for r in responses]
    assert all(r.json()["model_version"] == v for r, v in zip(responses, versions, strict=True))
    share = versions.count(2) / len(versions)
    assert abs(share - 0.10) <= 0.03, share
    again = asyncio.run(complete_many(gateway_a, bodies[:50]))  # sticky: same users, same side
    assert [r.headers["x-exforge-model-version"] for r in again] == [str(v) for v in versions[:50]]


def test_failing_canary_rolls_back_without_losing_requests(
    served: Served, gateway_a: RunningGateway
) -> None:
    rollout.promote(served.engine, MODEL, 1)
    rollout.split(served.engine, MODEL, 3, 50.0, sticky=False)  # v3 is not loaded: it fails
    asyncio.run(gateway_a.gateway.refresh())
    bodies = [{"model": MODEL, "prompt": "canary", "max_tokens": 2, "seed": i} for i in range(30)]
    responses = asyncio.run(complete_many(gateway_a, bodies, parallel=4))
    assert [r.status_code for r in responses] == [200] * 30  # none lost
    assert {r.headers["x-exforge-model-version"] for r in responses} == {"1"}
    state = rollout.get_state(served.engine, MODEL)
    assert state is not None and state.canary is None and state.stable == 1
    last = rollout.events(served.engine, MODEL)[-1]
    assert last["action"] == "rolled_back" and last["detail"].startswith("automatic: error rate")
    assert get_version(served.engine, MODEL, 3)["status"] == "retired"


def test_killing_a_triton_loses_no_unstarted_request(served: Served) -> None:
    rollout.promote(served.engine, MODEL, 1)
    urls = [served.a.grpc_url, served.b.grpc_url]
    with run_gateway(served.settings, served.engine, urls, free_port()) as gw:
        results = asyncio.run(kill_under_load(gw, served))
    lost_unstarted = [r for r in results if r["error"] and r["tokens"] == 0]
    assert not lost_unstarted, lost_unstarted
    assert sum(1 for r in results if not r["error"]) >= len(results) // 2
    assert all(not r["error"] for r in results[12:])  # sent after the kill: all served


async def kill_under_load(gw: RunningGateway, served: Served) -> list[dict[str, object]]:
    """12 streams, then SIGKILL Triton A once tokens flow, then 12 more streams."""
    first_tokens = asyncio.Event()

    async def stream(client: httpx.AsyncClient, index: int) -> dict[str, object]:
        body = {
            "model": MODEL,
            "prompt": f"kill {index}",
            "max_tokens": 24,
            "stream": True,
            "seed": index,
        }
        result: dict[str, object] = {"tokens": 0, "error": None}
        try:
            async with client.stream("POST", f"{gw.url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result["error"] = response.status_code
                    return result
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            result["error"] = event["error"]
                        elif event["choices"][0]["finish_reason"] is None:
                            result["tokens"] = int(result["tokens"]) + 1
                            first_tokens.set()
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        return result

    async with httpx.AsyncClient(timeout=120, headers=gw.headers) as client:
        before = [asyncio.create_task(stream(client, i)) for i in range(12)]
        await first_tokens.wait()
        pid = triton.running_pid(triton.pid_file(served.settings, served.a))
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        after = [asyncio.create_task(stream(client, 100 + i)) for i in range(12)]
        return list(await asyncio.gather(*before, *after))


def test_trtllm_flavor_files_follow_the_contract(served: Served, tmp_path: Path) -> None:
    from serving.contract import INPUTS, OUTPUTS
    from serving.modelconfig import parse

    store = open_store(served.settings)
    result = export(served.settings, store, served.engine, MODEL, 1, "trtllm", tmp_path)
    repo = result.repository / MODEL / "1" / "repository"
    configs = {p.parent.name: parse(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {"preprocessing", "tensorrt_llm", "postprocessing", MODEL}
    entry = configs[MODEL]
    assert [(i.name, i.optional) for i in entry.input] == [(s.name, s.optional) for s in INPUTS]
    types = {i.name: i.data_type for i in entry.input} | {o.name: o.data_type for o in entry.output}
    from tritonclient.grpc import model_config_pb2 as pb

    for spec in (*INPUTS, *OUTPUTS):
        assert types[spec.name] == pb.DataType.Value(spec.triton_type), spec
    engine = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["enable_kv_cache_reuse"] == "true"
    assert 0 < float(params["kv_cache_free_gpu_mem_fraction"]) < 1
    assert engine.dynamic_batching.max_queue_delay_microseconds > 0
    assert entry.parameters["tensorrt_llm_model_name"].string_value == "tensorrt_llm"
    assert (result.repository / MODEL / "1" / "build_engine.sh").stat().st_mode & 0o111
    assert (result.repository / MODEL / "1" / "checkpoint" / "config.json").is_file()
    np.testing.assert_equal(len(list((repo / "tensorrt_llm").iterdir())), 2)
