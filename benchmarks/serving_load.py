"""Serving load benchmark: N concurrent streaming clients through gateway → Triton, against
the same decoding loop called in-process, in one run (the serving path's overhead ratio).

    .venv/bin/python benchmarks/serving_load.py --clients 8 --requests 64 --max-tokens 16

Registers and exports one tiny-model version into a temporary data dir, starts a local
tritonserver (python backend) and the gateway on loopback ports, and prints JSON:
p50/p95 time to first token and latency, tokens/s, for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exforge.core.db import open_database  # noqa: E402
from exforge.core.settings import load_settings  # noqa: E402
from exforge.core.store import open_store  # noqa: E402
from exforge.llm.generation import GenerationRequest, Generator  # noqa: E402
from serving import rollout, triton  # noqa: E402
from serving.export import export  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.support.serving import MODEL, register_versions, run_gateway  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ttft: list[float], latency: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p95_ms": round(percentile(ttft, 0.95) * 1000, 1),
        "latency_p50_ms": round(statistics.median(latency) * 1000, 1),
        "latency_p95_ms": round(percentile(latency, 0.95) * 1000, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens": tokens,
        "wall_s": round(wall, 2),
    }


async def through_gateway(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict:
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

    async with httpx.AsyncClient(timeout=300, headers=headers) as client:
        wall = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(args.requests)))
        return summary(ttft, latency, tokens, time.perf_counter() - wall)


def in_process(model_dir: Path, args: argparse.Namespace) -> dict:
    """The same requests on the same decoding loop, `clients` threads, no serving path."""
    import torch

    torch.set_num_threads(1)
    generator = Generator.from_dir(model_dir)
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0
    lock = threading.Lock()
    queue = list(range(args.requests))

    def worker() -> None:
        nonlocal tokens
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop()
            request = GenerationRequest(
                f"defmodule Bench{index} do", args.max_tokens, 0.8, 1.0, (), index
            )
            started = time.perf_counter()
            first = None
            count = 0
            for _ in generator.stream(request):
                first = first or time.perf_counter()
                count += 1
            with lock:
                ttft.append((first or time.perf_counter()) - started)
                latency.append(time.perf_counter() - started)
                tokens += count

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(ttft, latency, tokens, time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), gateway_concurrency=args.clients)
        store, engine = open_store(settings), open_database(settings)
        register_versions(settings, store, engine, 1)
        export(settings, store, engine, MODEL, 1, "cpu")
        rollout.promote(engine, MODEL, 1)
        instance = triton.Instance("bench-triton", free_port(), free_port(), free_port())
        repository = settings.root / "triton" / "cpu"
        triton.start(settings, instance, repository)
        try:
            triton.load(instance, MODEL, [1])
            with run_gateway(settings, engine, [instance.grpc_url], free_port()) as gw:
                served = asyncio.run(through_gateway(gw.url, gw.headers, args))
        finally:
            triton.stop(settings, instance)
        direct = in_process(repository / MODEL / "1" / "model", args)
    result = {
        "config": vars(args),
        "gateway_triton": served,
        "in_process": direct,
        "overhead_ratio_latency_p50": round(served["latency_p50_ms"] / direct["latency_p50_ms"], 2),
        "overhead_ratio_tokens_per_s": round(direct["tokens_per_s"] / served["tokens_per_s"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
