"""Generation for evaluation: n samples per problem, cached so an interrupted run resumes.

A `Generator` turns a batch of prompts into raw continuations; `InProcessGenerator` runs a
registered version (base model + its LoRA adapter, merged by the serving export code)
with transformers, batched with left padding. A Triton-backed generator only needs the
same `complete` method. Every continuation is cut at the first of its problem's stop
tokens, as MultiPL-E does, and stored under
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
from transformers import GenerationConfig, LogitsProcessor, MistralForCausalLM, StoppingCriteria

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.chat import text_tokenizer
from exforge.llm.lora import merged_version_dir
from exforge.llm.model import load_model
from workers.evaluator.benchmarks import Completion, Problem

CACHE_PREFIX = "generations/"
NUCLEUS_PROBE = 1024


@dataclass(frozen=True)
class Request:
    prompt: str
    stop_tokens: tuple[str, ...]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.2  # MultiPL-E's setting for pass@1
    max_tokens: int = 256
    top_p: float = 0.95
    batch_size: int = 16


class Generator(Protocol):
    """Raw continuations of a batch of prompts (stop tokens may end them early)."""

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]: ...


def truncate_at_stop(text: str, stop_tokens: Sequence[str]) -> str:
    """The text before the first occurrence of any stop token (MultiPL-E's rule)."""
    positions = [text.find(token) for token in stop_tokens if token and token in text]
    return text[: min(positions)] if positions else text


# ------------------------------------------------------------------ in-process generation


class _StopOnText(StoppingCriteria):
    """Per row: done once its decoded continuation contains one of its stop tokens."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: Sequence[tuple[str, ...]],
        prompt_width: int,
    ) -> None:
        self.decode = decode
        self.stops = stops
        self.width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        done = [
            any(token in self.decode(row[self.width :].tolist()) for token in stops)
            for row, stops in zip(input_ids, self.stops, strict=True)
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _GumbelSampling(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling as an argmax: adding Gumbel noise to the
    log-probabilities and taking the largest draws exactly from the distribution, and is
    far faster on CPU than `torch.multinomial` over a 131k vocabulary."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logits = self._nucleus(logits)
        noise = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
        return logits + noise

    def _nucleus(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the smallest set of most likely tokens whose mass reaches top_p. Looks at
        the top 1024 first (a trained model's nucleus is small), all of them otherwise."""
        ordered, order = torch.topk(logits, min(NUCLEUS_PROBE, logits.shape[-1]), dim=-1)
        if bool((ordered.exp().sum(dim=-1) < self.top_p).any()):
            ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.exp()
        outside = torch.cumsum(probs, dim=-1) - probs >= self.top_p
        kept = torch.full_like(logits, -torch.inf)
        return kept.scatter(-1, order, ordered.masked_fill(outside, -torch.inf))


class InProcessGenerator:
    """A transformers model and the Tekken tokenizer, generating left-padded batches."""

    def __init__(self, model: MistralForCausalLM, tokenizer: Any) -> None:
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

    def decode(self, ids: list[int]) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]:
        encoded = [self.tokenizer.encode(r.prompt, bos=True, eos=False) for r in requests]
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_id
        device = self.model.device
        input_ids = torch.tensor(
            [[pad] * (width - len(ids)) + ids for ids in encoded], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
        )
        config = GenerationConfig(
            max_new_tokens=sampling.max_tokens,
            do_sample=False,  # sampling, when asked for, is `_GumbelSampling`'s argmax
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_id,
        )
        processors = (
            [_GumbelSampling(sampling.temperature, sampling.top_p)]
            if sampling.temperature > 0
            else []
        )
        stop = _StopOnText(self.decode, [r.stop_tokens for r in requests], width)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=[stop],
            )
        return [self.decode(row[width:].tolist()) for row in output]


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


def _batch_seed(key: str) -> int:
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
        torch.manual_seed(_batch_seed(batch[0][2]))
        texts = generator.complete(
            [Request(p.prompt, p.stop_tokens) for p, _, _ in batch], sampling
        )
        for (problem, _, key), text in zip(batch, texts, strict=True):
            cache.put(key, problem, truncate_at_stop(text, problem.stop_tokens))
        if on_generated:
            on_generated(len(batch))
    completions = [Completion(problem.name, cache.get(key)) for problem, _, key in wanted]
    return Generated(completions, len(missing), len(wanted) - len(missing))
