"""Serving load benchmark: continuous batching against one-at-a-time decoding of the same
requests, both through gateway → Triton (cpu flavor) in one run, and the prefix-cache hit
rate of chat requests that share a system prompt.

    .venv/bin/python benchmarks/serving_load.py --clients 8 --requests 32 --max-tokens 32 --rounds 2

Registers and exports one tiny-model version into a temporary data dir, starts a local
tritonserver and the gateway on loopback ports, the gateway in its own process as
`exforge serve gateway` runs in production (the load-generating client here does not share
its interpreter), and loads the model alternately with
`decode_batch` 1 (one request decodes at a time; the others wait in Triton) and
`decode_batch` = clients (requests join the running batch), `--rounds` times each. Prints
JSON: tokens/s, TTFT and latency p50/p95 per round, the batched/sequential tokens/s ratio
of each round, and the prefix-cache hit rate (and cached share of prompt tokens).

On a shared machine other processes' load moves the tokens/s ratio; the CPU time spent per
token by every process of the serving path (this client, the gateway, tritonserver and
its python-backend stub) does not depend on it, and its sequential/batched ratio
(`cpu_sequential_over_batched`) is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exforge.core.db import open_database  # noqa: E402
from exforge.core.settings import ENV_PREFIX, Settings, load_settings  # noqa: E402
from exforge.core.stack import free_port  # noqa: E402
from exforge.core.store import open_store  # noqa: E402
from serving import rollout, triton  # noqa: E402
from serving.export import export  # noqa: E402
from serving.keys import create_key  # noqa: E402
from tests.support.serving import MODEL, register_versions  # noqa: E402

GATEWAY_START_S = 120.0


@contextmanager
def gateway_process(settings: Settings, triton_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`exforge serve gateway` on a free port in its own process: its URL and auth headers."""
    port = free_port()
    overrides = {
        "DATA_DIR": str(settings.data_dir),
        "GATEWAY_PORT": str(port),
        "GATEWAY_CONCURRENCY": str(settings.gateway_concurrency),
        "TRITON_URL": triton_url,
    }
    env = os.environ | {ENV_PREFIX + name: value for name, value in overrides.items()}
    exforge = Path(sys.executable).parent / "exforge"
    process = subprocess.Popen([str(exforge), "serve", "gateway"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + GATEWAY_START_S
        while not _answers(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.2)
        _, secret = create_key(
            open_database(settings), "bench", ["generate", "models"], rate_per_s=1000, burst=2000
        )
        yield url, {"Authorization": f"Bearer {secret}"}
    finally:
        process.terminate()
        process.wait(30)


Processes = dict[tuple[int, float], float]  # (pid, start time) -> CPU seconds so far


def cpu_times() -> Processes:
    """CPU time (user + system) used so far by this process and each it started."""
    me = psutil.Process()
    times = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            used = process.cpu_times()
            times[(process.pid, process.create_time())] = used.user + used.system
        except psutil.NoSuchProcess:
            continue
    return times


def cpu_since(before: Processes) -> float:
    """CPU seconds used since `before` by the processes alive now (a model load replaces
    the python-backend stub: the old one's time does not count, the new one's all does)."""
    return sum(used - before.get(key, 0.0) for key, used in cpu_times().items())


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ttft: list[float], latency: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p95_ms": round(percentile(ttft, 0.95) * 1000, 1),
        "latency_p50_ms": round(statistics.median(latency) * 1000, 1),
        "latency_p95_ms": round(percentile(latency, 0.95) * 1000, 1),
        "tokens": tokens,
        "wall_s": round(wall, 2),
    }


async def load(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """`requests` streamed completions, `clients` at a time."""
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(args.clients)

    async def one(client: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens
        body = {
            "model": MODEL,
            "prompt": f"defmodule Bench{index} do",
            "stream": True,
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": index,
        }
        async with gate:
            started = time.perf_counter()
            first = None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"finish_reason": null' in line:
                        first = first or time.perf_counter()
                        tokens += 1
            ttft.append((first or time.perf_counter()) - started)
            latency.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        wall = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(args.requests)))
        return summary(ttft, latency, tokens, time.perf_counter() - wall)


async def shared_system_prompt(url: str, headers: dict[str, str], count: int) -> dict[str, float]:
    """Chat requests with one long system prompt and different questions, in turn."""
    system = f"Session {uuid.uuid4().hex}. " + "Answer in idiomatic, tested Elixir. " * 16
    cached, prompt = [], []
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        for index in range(count):
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question {index}: a GenServer for {index}?"},
                ],
                "max_tokens": 2,
                "temperature": 0,
            }
            usage = (await client.post(f"{url}/v1/chat/completions", json=body)).json()["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
            prompt.append(usage["prompt_tokens"])
    return {
        "requests": count,
        "hit_rate": round(sum(c > 0 for c in cached) / count, 3),
        "cached_share_of_prompt_tokens": round(sum(cached) / sum(prompt), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefix-requests", type=int, default=16)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), gateway_concurrency=args.clients)
        store, engine = open_store(settings), open_database(settings)
        register_versions(settings, store, engine, 1)
        export(settings, store, engine, MODEL, 1, "cpu")
        rollout.promote(engine, MODEL, 1)
        instance = triton.Instance("bench-triton", free_port(), free_port(), free_port())
        triton.start(settings, instance, settings.root / "triton" / "cpu")
        try:
            with gateway_process(settings, instance.grpc_url) as (url, headers):
                for _ in range(args.rounds):
                    measured = {}
                    for name, batch in (("sequential", 1), ("batched", args.clients)):
                        triton.load(instance, MODEL, [1], decode_batch=batch)
                        before = cpu_times()
                        result = asyncio.run(load(url, headers, args))
                        cpu_ms = cpu_since(before) * 1000 / max(result["tokens"], 1)
                        measured[name] = result | {"cpu_ms_per_token": round(cpu_ms, 2)}
                    batched, sequential = measured["batched"], measured["sequential"]
                    ratio = batched["tokens_per_s"] / sequential["tokens_per_s"]
                    cpu_ratio = sequential["cpu_ms_per_token"] / batched["cpu_ms_per_token"]
                    rounds.append(
                        measured
                        | {
                            "batched_over_sequential": round(ratio, 2),
                            "cpu_sequential_over_batched": round(cpu_ratio, 2),
                            "load_average_1min": os.getloadavg()[0],
                        }
                    )
                prefix = asyncio.run(shared_system_prompt(url, headers, args.prefix_requests))
        finally:
            triton.stop(settings, instance)
    result = {
        "config": vars(args),
        "rounds": rounds,
        "batched_over_sequential": [r["batched_over_sequential"] for r in rounds],
        "cpu_sequential_over_batched": [r["cpu_sequential_over_batched"] for r in rounds],
        "load_average_1min": [r["load_average_1min"] for r in rounds],
        "prefix_cache": prefix,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
