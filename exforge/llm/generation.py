"""Streaming text generation with a transformers Mistral model and the Tekken tokenizer.

Used by the Triton python-backend model (cpu flavor) and, in-process, by the load
benchmark's baseline, so both run exactly the same decoding loop. Each step yields one
token and the text it added (possibly empty while a multi-byte character is incomplete),
so a stream of steps counts tokens exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, MistralForCausalLM

from exforge.llm.chat import text_tokenizer
from exforge.llm.model import load_model

REPLACEMENT = "\ufffd"
CPU = torch.device("cpu")  # the python backend decodes with tensors on the CPU


@dataclass(frozen=True)
class GenerationRequest:
    """The TensorRT-LLM ensemble's request fields, as Python values."""

    text: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_words: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Step:
    token_id: int
    text: str


@dataclass
class PrefixCache:
    """KV cache of the most recent prompt prefix (a shared system prompt is reused)."""

    ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: int = 0


class Generator:
    """One loaded model; `stream` may run from several threads at once."""

    def __init__(self, model: MistralForCausalLM, tokenizer: object) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix = PrefixCache()

    @classmethod
    def from_dir(cls, model_dir: Path) -> Generator:
        model = load_model(str(model_dir), "none", dtype=torch.bfloat16, device=CPU)
        return cls(model.eval(), text_tokenizer(model_dir))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=True, eos=False)

    def stream(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Iterator[Step]:
        """Yield one step per generated token until max_tokens, EOS or a stop word."""
        ids = self.encode(request.text)
        generator = torch.Generator().manual_seed(request.seed)
        generated: list[int] = []
        emitted = ""
        with torch.inference_mode():
            logits, cache = self._prefill(ids)
            for _ in range(request.max_tokens):
                if cancelled is not None and cancelled.is_set():
                    return
                token = sample(logits, request.temperature, request.top_p, generator)
                if token == self.tokenizer.eos_id:
                    return
                generated.append(token)
                text = self.tokenizer.decode(generated)
                stable = text.rstrip(REPLACEMENT)
                stop = _first_stop(stable, request.stop_words)
                if stop is not None:
                    yield Step(token, stable[len(emitted) : stop])
                    return
                yield Step(token, stable[len(emitted) :])
                emitted = stable if len(stable) > len(emitted) else emitted
                out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                logits = out.logits[0, -1]

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt, reusing the cached KV of the longest shared prefix."""
        shared = self._shared_prefix(ids)
        cache = DynamicCache()
        if shared:
            with self.prefix.lock:
                cache = _copy_cache(self.prefix.cache, shared)
                self.prefix.hits += 1
        out = self.model(torch.tensor([ids[shared:]]), past_key_values=cache, use_cache=True)
        self._remember(ids, cache)
        return out.logits[0, -1], cache

    def _shared_prefix(self, ids: Sequence[int]) -> int:
        with self.prefix.lock:
            known = self.prefix.ids
            n = 0
            limit = min(len(known), len(ids) - 1)  # keep one token to compute logits
            while n < limit and known[n] == ids[n]:
                n += 1
            return n if n >= MIN_PREFIX else 0

    def _remember(self, ids: list[int], cache: DynamicCache) -> None:
        with self.prefix.lock:
            self.prefix.ids = list(ids)
            self.prefix.cache = _copy_cache(cache, len(ids))


MIN_PREFIX = 16  # shorter shared prefixes are not worth a cache copy


def _copy_cache(cache: DynamicCache, length: int) -> DynamicCache:
    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), index)
    return copy


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling with a seeded generator."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stop_words: Sequence[str]) -> int | None:
    positions = [text.find(word) for word in stop_words if word and word in text]
    return min(positions) if positions else None
