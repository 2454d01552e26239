"""Serving load benchmark: continuous batching against one-at-a-time decoding of the same
requests, both through gateway → Triton (cpu flavor) in one run, and the prefix-cache hit
rate of chat requests that share a system prompt.

    .venv/bin/python benchmarks/serving_load.py --clients 8 --requests 32 --max-tokens 32 --rounds 2

Registers and exports one tiny-model version into a temporary data dir, starts a local
tritonserver and the gateway on loopback ports, and loads the model alternately with
`decode_batch` 1 (one request decodes at a time; the others wait in Triton) and
`decode_batch` = clients (requests join the running batch), `--rounds` times each. Prints
JSON: tokens/s, TTFT and latency p50/p95 per round, the batched/sequential tokens/s ratio
of each round, and the prefix-cache hit rate (and cached share of prompt tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exforge.core.db import open_database  # noqa: E402
from exforge.core.settings import load_settings  # noqa: E402
from exforge.core.store import open_store  # noqa: E402
from serving import rollout, triton  # noqa: E402
from serving.export import export  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.support.serving import MODEL, register_versions, run_gateway  # noqa: E402


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
            with run_gateway(settings, engine, [instance.grpc_url]) as gw:
                for _ in range(args.rounds):
                    measured = {}
                    for name, batch in (("sequential", 1), ("batched", args.clients)):
                        triton.load(instance, MODEL, [1], decode_batch=batch)
                        measured[name] = asyncio.run(load(gw.url, gw.headers, args))
                    ratio = (
                        measured["batched"]["tokens_per_s"] / measured["sequential"]["tokens_per_s"]
                    )
                    rounds.append(measured | {"batched_over_sequential": round(ratio, 2)})
                prefix = asyncio.run(shared_system_prompt(gw.url, gw.headers, args.prefix_requests))
        finally:
            triton.stop(settings, instance)
    result = {
        "config": vars(args),
        "rounds": rounds,
        "batched_over_sequential": [r["batched_over_sequential"] for r in rounds],
        "prefix_cache": prefix,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
