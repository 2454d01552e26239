"""Generation for evaluation: n samples per problem, cached so an interrupted run resumes.

A `Generator` turns a batch of prompts into raw continuations; `InProcessGenerator` runs a
registered version (base model + its LoRA adapter, merged by the serving export code)
with the serving decoding loop, continuously batched, each sample with its own seed. A
Triton-backed generator only needs the same `complete` method. Every continuation is cut
at the first of its problem's stop tokens, as MultiPL-E does, and stored under
`generations/<model>/<version>/<problem digest>/<sample index>.json`, where the digest
covers the prompt, the stop tokens and the sampling settings: a rerun generates only the
samples that are not stored yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm import generation
from exforge.llm.chat import text_ids, text_tokenizer
from exforge.llm.generation import Decoder, complete
from exforge.llm.lora import merged_version_dir
from exforge.llm.model import load_model
from workers.evaluator.benchmarks import Completion, Problem

CACHE_PREFIX = "generations/"


@dataclass(frozen=True)
class Request:
    prompt: str
    stop_tokens: tuple[str, ...]
    seed: int = 0


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.2  # MultiPL-E's setting for pass@1
    max_tokens: int = 256
    top_p: float = 0.95
    batch_size: int = 16

    def decoding(self, stop: tuple[str, ...], seed: int) -> generation.Sampling:
        return generation.Sampling(self.max_tokens, self.temperature, self.top_p, 0, seed, stop)


class Generator(Protocol):
    """Raw continuations of a batch of prompts (stop tokens may end them early)."""

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]: ...


def truncate_at_stop(text: str, stop_tokens: Sequence[str]) -> str:
    """The text before the first occurrence of any stop token (MultiPL-E's rule)."""
    positions = [text.find(token) for token in stop_tokens if token and token in text]
    return text[: min(positions)] if positions else text


# ------------------------------------------------------------------ in-process generation


class InProcessGenerator:
    """A version's merged model decoding in this process with the serving loop
    (`exforge.llm.generation`): prompts tokenised as Triton tokenises `text_input`, a
    batch of `batch_size` requests decoded together, each with its own seed, so a
    sample is the same here and through Triton."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, model_dir: Path) -> InProcessGenerator:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = load_model(str(model_dir), "none", dtype=dtype)
        return cls(model, text_tokenizer(model_dir))

    @classmethod
    def for_version(
        cls, settings: Settings, store: ObjectStore, row: dict[str, Any]
    ) -> InProcessGenerator:
        return cls.from_dir(merged_version_dir(settings, store, row))

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]:
        decoder = Decoder(self.model, self.tokenizer, max_batch=sampling.batch_size)
        prompts = [
            (text_ids(self.tokenizer, r.prompt), sampling.decoding(r.stop_tokens, r.seed))
            for r in requests
        ]
        return [done.text for done in complete(decoder, prompts)]


# ------------------------------------------------------------------ cache and resume


@dataclass(frozen=True)
class Generated:
    completions: list[Completion]
    generated: int  # new this run
    cached: int  # read back from the store


class GenerationCache:
    """Completions of one model version in the store, one object per sample."""

    def __init__(self, store: ObjectStore, model: str, version: int, sampling: Sampling) -> None:
        self.store = store
        self.prefix = f"{CACHE_PREFIX}{model}/{version}/"
        self.settings = {k: v for k, v in asdict(sampling).items() if k != "batch_size"}

    def key(self, problem: Problem, index: int) -> str:
        identity = json.dumps(
            [problem.prompt, list(problem.stop_tokens), self.settings], sort_keys=True
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        return f"{self.prefix}{digest}/{index}.json"

    def stored(self) -> set[str]:
        return set(self.store.list(self.prefix))

    def get(self, key: str) -> str:
        return json.loads(self.store.get(key))["completion"]

    def put(self, key: str, problem: Problem, completion: str) -> None:
        record = {"name": problem.name, "completion": completion}
        self.store.put(key, json.dumps(record).encode())


def sample_seed(key: str) -> int:
    """A sample's seed, from its cache key: the same sample draws the same text in every
    run and every batch."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def generate_completions(
    generator: Generator,
    cache: GenerationCache,
    problems: Sequence[Problem],
    n: int,
    sampling: Sampling,
    on_generated: Callable[[int], None] | None = None,
) -> Generated:
    """n completions per problem: stored ones are read back, the rest generated in
    batches, each sample stored as soon as its batch finishes."""
    stored = cache.stored()
    wanted = [
        (problem, index, cache.key(problem, index)) for problem in problems for index in range(n)
    ]
    missing = [item for item in wanted if item[2] not in stored]
    for start in range(0, len(missing), sampling.batch_size):
        batch = missing[start : start + sampling.batch_size]
        texts = generator.complete(
            [Request(p.prompt, p.stop_tokens, sample_seed(key)) for p, _, key in batch], sampling
        )
        for (problem, _, key), text in zip(batch, texts, strict=True):
            cache.put(key, problem, truncate_at_stop(text, problem.stop_tokens))
        if on_generated:
            on_generated(len(batch))
    completions = [Completion(problem.name, cache.get(key)) for problem, _, key in wanted]
    return Generated(completions, len(missing), len(wanted) - len(missing))
