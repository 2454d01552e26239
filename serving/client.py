"""Stream one completion straight from Triton over gRPC (the path `exforge generate`
and the demo use; the gateway adds routing, auth and rollouts on top of the same pool)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from serving.contract import LlmRequest
from serving.pool import Pool


async def stream_completion(
    urls: list[str],
    model: str,
    version: int,
    prompt: str,
    max_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> AsyncIterator[str]:
    """Text deltas as Triton produces them, one per generated token."""
    pool = Pool(urls)
    await pool.start()
    try:
        arrays = LlmRequest(prompt, max_tokens, temperature, seed=seed).arrays()
        stream = await pool.open_stream(model, version, arrays, timeout_s)
        for delta in stream.first:
            yield delta.text
        async for delta in stream.rest:
            yield delta.text
    finally:
        await pool.close()
