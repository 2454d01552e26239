"""Serving end to end, all real: exported versions on two tritonservers (python backend),
tritonclient gRPC streaming, the gateway over HTTP/SSE and WebSocket, deadlines, canary
rollouts judged on real traffic, failover when a Triton dies.

Streaming is measured at the source: the slow version's server stamps every token
(`last_token_time_ns`, the gateway's `produced_ns`), and the client's first token must
arrive before the server has made the last one. The last test kills Triton B.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
import websockets

from exforge.llm.registry import get_version
from serving import rollout, triton
from serving.contract import SPECS, LlmRequest
from serving.export import export
from serving.keys import create_key, revoke
from serving.usage import report
from tests.support.serving import (
    DIVERGED,
    MODEL,
    SLOW,
    RunningGateway,
    Served,
    run_gateway,
    stable_version,
)

# The first test to use the shared servers waits for two tritonservers to load five
# model versions (minutes on a busy 2-core machine).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gateway_a(served: Served) -> Iterator[RunningGateway]:
    with run_gateway(served.settings, served.engine, [served.a.grpc_url]) as gw:
        yield gw


def grpc_stream(
    url: str, version: int, request: LlmRequest
) -> list[tuple[int, dict[str, int | str]]]:
    """Stream one request with plain tritonclient: (arrival ns, outputs) per response."""
    client = grpcclient.InferenceServerClient(url)
    arrivals: queue.Queue[tuple[object, object, int]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: arrivals.put((result, error, time.time_ns()))
    )
    inputs = []
    for name, array in request.arrays().items():
        tensor = grpcclient.InferInput(name, list(array.shape), SPECS[name].wire_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.async_stream_infer(
        MODEL, inputs, model_version=str(version), enable_empty_final_response=True
    )
    responses = []
    while True:
        result, error, at = arrivals.get(timeout=120)
        assert error is None, error
        response = result.get_response()  # type: ignore[attr-defined]
        if response.outputs:
            outputs = {o.name: result.as_numpy(o.name).reshape(-1)[0] for o in response.outputs}  # type: ignore[attr-defined]
            outputs["text_output"] = outputs["text_output"].decode()
            responses.append((at, outputs))
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return responses


def test_export_writes_versions_and_cards(served: Served) -> None:
    from serving.modelconfig import parse

    model_dir = served.settings.root / "triton" / "cpu" / MODEL
    config = parse((model_dir / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [1, 2, DIVERGED, SLOW]
    assert config.model_transaction_policy.decoupled
    card = json.loads((model_dir / "2" / "card.json").read_text())
    assert card["base_model"] == "tiny" and card["adapter"].endswith("run2/adapter.safetensors")
    assert json.loads((model_dir / str(SLOW) / "decoding.json").read_text())["token_delay_s"] > 0
    assert served.store.exists(f"triton/cpu/{MODEL}/2/model.py")
    assert served.store.exists(f"triton/cpu/{MODEL}/config.pbtxt")


def test_triton_streams_one_response_per_token_over_grpc(served: Served) -> None:
    request = LlmRequest("defmodule Stack do", 12)
    one = grpc_stream(served.a.grpc_url, 1, request)
    two = grpc_stream(served.a.grpc_url, 2, request)
    assert [r["num_output_tokens"] for _, r in one] == list(range(1, 13))
    assert all(r["num_input_tokens"] == one[0][1]["num_input_tokens"] > 1 for _, r in one)
    text = ["".join(str(r["text_output"]) for _, r in rs) for rs in (one, two)]
    assert text[0] != text[1]  # different versions
    states = {(m["version"], m["state"]) for m in triton.index(served.a)}
    assert {("1", "READY"), ("2", "READY"), (str(SLOW), "READY")} <= states


def test_grpc_stream_reaches_the_client_before_the_server_finishes(served: Served) -> None:
    responses = grpc_stream(served.a.grpc_url, SLOW, LlmRequest("defmodule Stack do", 8))
    made = [int(r["last_token_time_ns"]) for _, r in responses]
    assert made == sorted(made) and len(set(made)) == len(made) == 8  # one stamp per token
    first_arrival = responses[0][0]
    assert first_arrival < made[-1]  # the first token was out before the last was made
    fast = grpc_stream(served.a.grpc_url, 1, LlmRequest("defmodule Stack do", 8))
    assert [r["text_output"] for _, r in fast] == [r["text_output"] for _, r in responses]


def sse_events(response: httpx.Response) -> Iterator[tuple[int, dict[str, object] | str]]:
    """(arrival ns, payload) per SSE data line."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            yield time.time_ns(), payload if payload == "[DONE]" else json.loads(payload)


def test_sse_stream_reaches_the_client_before_the_server_finishes(
    served: Served, gateway_a: RunningGateway
) -> None:
    body = {"model": MODEL, "prompt": "defmodule Stack do", "max_tokens": 8, "stream": True}
    with (
        stable_version(served, gateway_a, SLOW),
        httpx.stream(
            "POST", f"{gateway_a.url}/v1/completions", json=body, headers=gateway_a.headers
        ) as response,
    ):
        assert response.headers["x-exforge-model-version"] == str(SLOW)
        events = list(sse_events(response))
    tokens = [(at, e) for at, e in events if isinstance(e, dict) and "produced_ns" in e]
    assert len(tokens) == 8
    made = [int(e["produced_ns"]) for _, e in tokens]  # type: ignore[call-overload]
    assert tokens[0][0] < made[-1]
    assert events[-1][1] == "[DONE]"


def test_websocket_stream_reaches_the_client_before_the_server_finishes(
    served: Served, gateway_a: RunningGateway
) -> None:
    async def session() -> list[tuple[int, dict[str, object]]]:
        url = gateway_a.url.replace("http", "ws") + "/v1/channel"
        async with websockets.connect(url, additional_headers=gateway_a.headers) as socket:
            await socket.send(json.dumps({"type": "join", "model": MODEL}))
            assert json.loads(await socket.recv())["model_version"] == SLOW
            await socket.send(
                json.dumps({"type": "generate", "id": "s", "prompt": "x", "max_tokens": 8})
            )
            events = []
            while not events or events[-1][1]["type"] != "done":
                events.append((time.time_ns(), json.loads(await socket.recv())))
            return events

    with stable_version(served, gateway_a, SLOW):
        events = asyncio.run(session())
    tokens = [(at, e) for at, e in events if e["type"] == "token"]
    assert len(tokens) == 8
    assert tokens[0][0] < int(tokens[-1][1]["produced_ns"])  # type: ignore[call-overload]


def test_websocket_takes_the_key_from_the_header_or_join_never_the_url(
    served: Served, gateway_a: RunningGateway
) -> None:
    url = gateway_a.url.replace("http", "ws") + "/v1/channel"

    async def joined(socket: object, join: dict[str, object]) -> dict[str, object]:
        await socket.send(json.dumps({"type": "join", "model": MODEL} | join))  # type: ignore[attr-defined]
        return json.loads(await socket.recv())  # type: ignore[attr-defined]

    async def run() -> tuple[dict[str, object], ...]:
        async with websockets.connect(url) as socket:
            by_join = await joined(socket, {"api_key": gateway_a.key})
            await socket.send(
                json.dumps({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 6})
            )
            events = []
            while not events or events[-1]["type"] != "done":
                events.append(json.loads(await socket.recv()))
        async with websockets.connect(url, additional_headers=gateway_a.headers) as socket:
            by_header = await joined(socket, {})
        async with websockets.connect(f"{url}?api_key={gateway_a.key}") as socket:
            refused = await joined(socket, {})
            await socket.wait_closed()
            code = socket.close_code
        return by_join, by_header, events[-1], refused, code

    by_join, by_header, done, refused, code = asyncio.run(run())
    assert by_join["type"] == by_header["type"] == "joined"
    assert done["usage"]["completion_tokens"] == 6  # type: ignore[index]
    assert refused["type"] == "error" and refused["error"]["code"] == "missing_api_key"  # type: ignore[index]
    assert code == 4401


def test_websocket_cancel_stops_a_generation(gateway_a: RunningGateway) -> None:
    async def session() -> list[dict[str, object]]:
        url = gateway_a.url.replace("http", "ws") + "/v1/channel"
        async with websockets.connect(url, additional_headers=gateway_a.headers) as socket:
            await socket.send(json.dumps({"type": "join", "model": MODEL}))
            await socket.recv()
            await socket.send(
                json.dumps({"type": "generate", "id": "b", "prompt": "y", "max_tokens": 400})
            )
            events = [json.loads(await socket.recv())]
            while events[-1]["type"] != "token":
                events.append(json.loads(await socket.recv()))
            await socket.send(json.dumps({"type": "cancel", "id": "b"}))
            while events[-1]["type"] != "cancelled":
                events.append(json.loads(await socket.recv()))
            return events

    events = asyncio.run(session())
    assert events[-1] == {"type": "cancelled", "id": "b"}
    assert [e["type"] for e in events].count("token") < 400


def test_revoked_key_stops_working_in_a_running_gateway(
    served: Served, gateway_a: RunningGateway
) -> None:
    """Over HTTP, and on a WebSocket that joined with the key before it was revoked."""
    key_id, secret = create_key(served.engine, "soon revoked", ["generate", "models"])
    url = f"{gateway_a.url}/v1/models"
    headers = {"Authorization": f"Bearer {secret}"}

    async def run() -> tuple[list[int], list[dict[str, object]], int | None]:
        channel = gateway_a.url.replace("http", "ws") + "/v1/channel"
        async with websockets.connect(channel) as socket:
            await socket.send(json.dumps({"type": "join", "model": MODEL, "api_key": secret}))
            events = [json.loads(await socket.recv())]
            await socket.send(
                json.dumps({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 1})
            )
            while events[-1]["type"] not in ("done", "error"):
                events.append(json.loads(await socket.recv()))
            assert httpx.get(url, headers=headers).status_code == 200
            revoke(served.engine, key_id)
            statuses = []
            for _ in range(50):  # the key TTL is 0.5 s here: revocation shows within a few
                statuses.append(httpx.get(url, headers=headers).status_code)
                if statuses[-1] == 401:
                    break
                await asyncio.sleep(0.1)
            # the gateway now knows: the open socket's next generate is refused
            await socket.send(
                json.dumps({"type": "generate", "id": "b", "prompt": "x", "max_tokens": 1})
            )
            events.append(json.loads(await socket.recv()))
            await socket.wait_closed()
            return statuses, events, socket.close_code

    statuses, events, code = asyncio.run(run())
    assert statuses[-1] == 401
    assert httpx.get(url, headers=headers).json()["error"]["code"] == "invalid_api_key"
    assert [e["type"] for e in events[:2]] == ["joined", "start"] and events[-2]["type"] == "done"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "invalid_api_key"  # type: ignore[index]
    assert code == 4401


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
    assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    served_tokens = sum(r.json()["usage"]["completion_tokens"] for r in statuses[:3])
    rows = [row for row in report(served.engine) if row["key_id"] == key_id]
    assert sum(row["completion_tokens"] for row in rows) == served_tokens == 9
    assert sum(row["requests"] for row in rows) == 3


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_queue_full_answers_429(served: Served) -> None:
    settings = served.settings.model_copy(update={"gateway_concurrency": 1, "gateway_queue": 0})
    with run_gateway(settings, served.engine, [served.a.grpc_url]) as gw:
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
            assert "choices" in next(events)[1]  # generating: the only slot is taken
            second = httpx.post(url, json=long | {"stream": False}, headers=gw.headers, timeout=60)
        assert second.status_code == 429, second.text[:300]
        assert int(second.headers["Retry-After"]) >= 1


def test_request_outliving_the_deadline_gets_504(served: Served) -> None:
    settings = served.settings.model_copy(update={"gateway_deadline_s": 1.0})
    with (
        run_gateway(settings, served.engine, [served.a.grpc_url]) as gw,
        stable_version(served, gw, SLOW),
    ):
        body = {"model": MODEL, "prompt": "a", "max_tokens": 60}  # 60 x 0.1 s > 1 s
        answer = httpx.post(f"{gw.url}/v1/completions", json=body, headers=gw.headers, timeout=60)
        with httpx.stream(
            "POST", f"{gw.url}/v1/completions", json=body | {"stream": True}, headers=gw.headers
        ) as response:
            lines = list(response.iter_lines())
    assert answer.status_code == 504
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "timeout"
    assert "deadline" in error["message"]
    at = lines.index("event: error")  # mid-stream: an SSE error event, then [DONE]
    assert json.loads(lines[at + 1][6:])["error"]["code"] == "timeout"
    assert "data: [DONE]" in lines[at:]


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
    gateway_a.refresh()
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
    rollout.promote(served.engine, MODEL, 1)


def test_canary_failing_inside_triton_rolls_back_without_losing_requests(
    served: Served, gateway_a: RunningGateway
) -> None:
    rollout.promote(served.engine, MODEL, 1)
    rollout.split(served.engine, MODEL, DIVERGED, 50.0, sticky=False)  # NaN weights: it fails
    gateway_a.refresh()
    bodies = [{"model": MODEL, "prompt": "canary", "max_tokens": 2, "seed": i} for i in range(30)]
    responses = asyncio.run(complete_many(gateway_a, bodies, parallel=4))
    assert [r.status_code for r in responses] == [200] * 30  # none lost
    assert {r.headers["x-exforge-model-version"] for r in responses} == {"1"}
    state = rollout.get_state(served.engine, MODEL)
    assert state is not None and state.canary is None and state.stable == 1
    last = rollout.events(served.engine, MODEL)[-1]
    assert last["action"] == "rolled_back" and last["detail"].startswith("automatic: error rate")
    assert get_version(served.engine, MODEL, DIVERGED)["status"] == "retired"


def test_slow_canary_rolls_back_on_p95_from_real_traffic(served: Served) -> None:
    settings = served.settings.model_copy(update={"rollback_p95_s": 0.8})
    rollout.promote(served.engine, MODEL, 1)
    rollout.split(served.engine, MODEL, SLOW, 50.0, sticky=False)
    with run_gateway(settings, served.engine, [served.a.grpc_url]) as gw:
        bodies = [  # 12 tokens at 0.1 s each: every slow answer takes over 1.2 s
            {"model": MODEL, "prompt": "slow", "max_tokens": 12, "temperature": 0.8, "seed": i}
            for i in range(24)
        ]
        responses = asyncio.run(complete_many(gw, bodies, parallel=4))
        after = asyncio.run(complete_many(gw, bodies[:8], parallel=4))
    assert [r.status_code for r in responses] == [200] * 24  # none lost
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in responses)
    assert str(SLOW) in {r.headers["x-exforge-model-version"] for r in responses}
    assert {r.headers["x-exforge-model-version"] for r in after} == {"1"}
    state = rollout.get_state(served.engine, MODEL)
    assert state is not None and (state.stable, state.canary) == (1, None)
    last = rollout.events(served.engine, MODEL)[-1]
    assert last["action"] == "rolled_back" and last["detail"].startswith("automatic: p95 latency")


def test_killing_a_triton_loses_no_unstarted_request(served: Served) -> None:
    rollout.promote(served.engine, MODEL, 1)
    urls = [served.a.grpc_url, served.b.grpc_url]
    with run_gateway(served.settings, served.engine, urls) as gw:
        results = asyncio.run(kill_under_load(gw, served))
    lost_unstarted = [r for r in results if r["error"] and r["tokens"] == 0]
    assert not lost_unstarted, lost_unstarted
    assert sum(1 for r in results if not r["error"]) >= len(results) // 2
    assert all(not r["error"] for r in results[12:])  # sent after the kill: all served


async def kill_under_load(gw: RunningGateway, served: Served) -> list[dict[str, object]]:
    """12 streams, then SIGKILL Triton B once tokens flow, then 12 more streams."""
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
                    if line.startswith("event: error"):
                        result["error"] = line
                    elif line.startswith("data: {"):
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
        pid = triton.running_pid(triton.pid_file(served.settings, served.b))
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        after = [asyncio.create_task(stream(client, 100 + i)) for i in range(12)]
        return list(await asyncio.gather(*before, *after))


def test_trtllm_flavor_exports_checkpoint_and_script(served: Served, tmp_path: Path) -> None:
    result = export(served.settings, served.store, served.engine, MODEL, 1, "trtllm", tmp_path)
    version_dir = result.repository / MODEL / "1"
    assert (version_dir / "build_engine.sh").stat().st_mode & 0o111
    assert (version_dir / "checkpoint" / "config.json").is_file()
    folders = {p.parent.name for p in (version_dir / "repository").glob("*/config.pbtxt")}
    assert folders == {"preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls", MODEL}
