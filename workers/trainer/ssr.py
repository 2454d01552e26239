"""Self-Synthesized Rehearsal (SSR, Huang et al. 2024): rehearse a stage without its data.

At the end of a stage (when a later one follows):

1. **synthesise**: for each of the stage's kinds, the current model sees a few real
   demonstrations of that kind as a few-shot prompt and writes a new instruction, then
   answers it in the same few-shot context (in-context learning);
2. **refine**: the latest model (the one that just finished the stage) answers each
   synthetic instruction again, zero-shot, in the chat format it was trained on; its
   answer replaces the draft when it is valid;
3. **validate**: every synthetic sample passes the validator real samples pass
   (`schemas.sharegpt`: structure, non-empty turns, token length);
4. **select**: keep `budget` samples, either the ones nearest the centres of k-means
   clusters over mean-pooled last hidden states (diverse rehearsal) or at random;
5. **store**: `runs/<run-id>/ssr/stage<N>.jsonl.zst`, in the shard format.

Later stages mix the buffers of all earlier stages into their real data at `ratio`
(`workers.trainer.data.mix`). Synthesis runs under a forked RNG, so it never shifts the
training run's random stream: a resumed run still repeats the uninterrupted losses.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import BaseModel, Field

from exforge.core.store import ObjectNotFound, ObjectStore, sha256_hex
from exforge.llm.chat import encode, prompt_ids
from exforge.llm.generation import Decoder, Sampling, complete
from schemas.shards import decode_shard, difficulty, encode_shard
from schemas.sharegpt import validate_sharegpt

Sample = dict[str, Any]
Selection = Literal["kmeans", "random"]


class SsrConfig(BaseModel):
    enabled: bool = False
    budget: int = Field(64, gt=0, description="Synthetic samples kept per stage.")
    ratio: float = Field(0.25, ge=0, description="Rehearsal samples per real sample, later.")
    selection: Selection = "kmeans"
    candidates: int | None = Field(None, gt=0, description="Generated per stage (2·budget).")
    demonstrations: int = Field(3, gt=0, description="Real examples in a few-shot prompt.")
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.8, gt=0)
    max_tokens: int | None = Field(None, gt=0, description="Longest sample kept (seq_len).")

    def limit(self, seq_len: int) -> int:
        return self.max_tokens or seq_len


def buffer_key(run_id: str, stage: int) -> str:
    return f"runs/{run_id}/ssr/stage{stage}.jsonl.zst"


# ---------------------------------------------------------------------------- prompts


def instruction(sample: Sample) -> str:
    return next(t["value"] for t in sample["conversations"] if t["from"] == "human")


def response(sample: Sample) -> str:
    return next(t["value"] for t in reversed(sample["conversations"]) if t["from"] == "gpt")


def task_prompt(demos: Sequence[Sample], kind: str) -> list[dict[str, str]]:
    """A user turn showing the demonstrations and asking for one new task of the kind."""
    shown = "\n\n".join(
        f"### Task {i}\n{instruction(d)}\n### Answer {i}\n{response(d)}"
        for i, d in enumerate(demos, 1)
    )
    ask = f"Write one new task of the kind `{kind}`, like these. Reply with the task only."
    return [{"from": "human", "value": f"{shown}\n\n{ask}"}]


def answer_prompt(demos: Sequence[Sample], task: str) -> list[dict[str, str]]:
    """The demonstrations as earlier turns, then the new task: answered in context."""
    turns: list[dict[str, str]] = []
    for demo in demos:
        turns += [
            {"from": "human", "value": instruction(demo)},
            {"from": "gpt", "value": response(demo)},
        ]
    return [*turns, {"from": "human", "value": task}]


# ------------------------------------------------------------------------- generation


def generate(
    model: torch.nn.Module,
    tokenizer: MistralTokenizer,
    turns: list[dict[str, str]],
    settings: SsrConfig,
    rng: random.Random,
) -> str:
    """Sample a reply to a conversation ending in a user turn (the serving decoding
    loop, seeded from `rng`)."""
    decoder = Decoder(model, tokenizer.instruct_tokenizer.tokenizer, max_batch=1)
    sampling = Sampling(
        settings.max_new_tokens, settings.temperature, top_p=0.95, seed=rng.getrandbits(63)
    )
    return complete(decoder, [(prompt_ids(turns), sampling)])[0].text.strip()


def synthetic_sample(task: str, answer: str, kind: str, stage: int, level: int) -> Sample:
    conversations = [{"from": "human", "value": task}, {"from": "gpt", "value": answer}]
    content = json.dumps(["ssr", kind, conversations], ensure_ascii=False)
    return {
        "id": sha256_hex(content.encode()),
        "conversations": conversations,
        "meta": {"kind": kind, "stage": stage, "difficulty": level},
    }


def synthesise(
    model: torch.nn.Module,
    tokenizer: MistralTokenizer,
    real: Sequence[Sample],
    stage: int,
    settings: SsrConfig,
    rng: random.Random,
) -> list[Sample]:
    """Draft samples, round-robin over the stage's kinds, from few-shot prompts."""
    by_kind: dict[str, list[Sample]] = {}
    for sample in real:
        by_kind.setdefault(sample.get("meta", {}).get("kind", "unknown"), []).append(sample)
    kinds = sorted(by_kind)
    drafts = []
    for number in range(settings.candidates or 2 * settings.budget):
        kind = kinds[number % len(kinds)]
        pool = by_kind[kind]
        demos = rng.sample(pool, min(settings.demonstrations, len(pool)))
        task = generate(model, tokenizer, task_prompt(demos, kind), settings, rng)
        answer = (
            generate(model, tokenizer, answer_prompt(demos, task), settings, rng) if task else ""
        )
        drafts.append(synthetic_sample(task, answer, kind, stage, difficulty(demos[0])))
    return drafts


def refine(
    model: torch.nn.Module,
    tokenizer: MistralTokenizer,
    sample: Sample,
    settings: SsrConfig,
    rng: random.Random,
) -> Sample:
    """The latest model's own zero-shot answer replaces the draft's, when it has one."""
    task = instruction(sample)
    if not task.strip():
        return sample
    answer = generate(model, tokenizer, [{"from": "human", "value": task}], settings, rng)
    if not answer:
        return sample
    meta = sample["meta"]
    return synthetic_sample(task, answer, meta["kind"], meta["stage"], meta["difficulty"])


# -------------------------------------------------------------------------- selection


@torch.no_grad()
def embeddings(
    model: torch.nn.Module, tokenizer: MistralTokenizer, samples: Sequence[Sample]
) -> torch.Tensor:
    """One vector per sample: the last hidden state, mean-pooled over its tokens."""
    device = next(model.parameters()).device
    vectors = []
    for sample in samples:
        ids = torch.tensor([encode(tokenizer, sample["conversations"]).input_ids], device=device)
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        vectors.append(hidden[-1][0].float().mean(dim=0).cpu())
    return torch.stack(vectors)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the (k, dim) centres."""
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(points), (1,), generator=generator))
    centres = points[first : first + 1]
    while len(centres) < k:
        distance = torch.cdist(points, centres).min(dim=1).values ** 2
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        centres = torch.cat([centres, points[chosen : chosen + 1]])
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        centres = torch.stack(
            [
                points[assignment == c].mean(dim=0) if (assignment == c).any() else centres[c]
                for c in range(k)
            ]
        )
    return centres


def nearest_to_centres(points: torch.Tensor, centres: torch.Tensor) -> list[int]:
    """For each centre the closest point not taken yet (so exactly k distinct indices)."""
    distance = torch.cdist(centres, points)
    taken: list[int] = []
    for row in distance:
        row = row.clone()
        row[taken] = float("inf")
        taken.append(int(row.argmin()))
    return sorted(taken)


def select(
    samples: list[Sample], budget: int, method: Selection, seed: int, vectors: torch.Tensor | None
) -> list[Sample]:
    """At most `budget` samples: k-means representatives, or a seeded random subset."""
    if len(samples) <= budget:
        return samples
    if method == "random" or vectors is None:
        return random.Random(seed).sample(samples, budget)
    chosen = nearest_to_centres(vectors, kmeans(vectors, budget, seed))
    return [samples[i] for i in chosen]


# ---------------------------------------------------------------------------- the buffer


@dataclass(frozen=True)
class Buffer:
    samples: list[Sample]
    candidates: int  # generated
    valid: int  # distinct and passing validation, before selection

    def metrics(self) -> dict[str, float]:
        return {
            "ssr_candidates": float(self.candidates),
            "ssr_valid": float(self.valid),
            "ssr_kept": float(len(self.samples)),
        }


def build_buffer(
    model: torch.nn.Module,
    tokenizer: MistralTokenizer,
    real: Sequence[Sample],
    stage: int,
    settings: SsrConfig,
    seed: int,
    max_tokens: int,
) -> Buffer:
    """Synthesise, refine, validate and select one stage's rehearsal buffer."""

    def count_tokens(turns: Sequence[dict[str, Any]]) -> int:
        return len(encode(tokenizer, turns).input_ids)

    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = random.Random(f"ssr/{seed}/{stage}")
        drafts = synthesise(model, tokenizer, real, stage, settings, rng)
        refined = [refine(model, tokenizer, draft, settings, rng) for draft in drafts]
    unique = {s["id"]: s for s in refined if validate_sharegpt(s, count_tokens, max_tokens)}
    valid = list(unique.values())
    vectors = embeddings(model, tokenizer, valid) if settings.selection == "kmeans" else None
    model.train(was_training)
    kept = select(valid, settings.budget, settings.selection, seed, vectors)
    return Buffer(kept, len(drafts), len(valid))


def store_buffer(store: ObjectStore, run_id: str, stage: int, samples: list[Sample]) -> str:
    key = buffer_key(run_id, stage)
    lines = [json.dumps(s, ensure_ascii=False, sort_keys=True) for s in samples]
    store.put(key, encode_shard(lines))
    return key


def load_buffers(store: ObjectStore, run_id: str, stages: Sequence[int]) -> list[Sample]:
    """The stored buffers of the given stages (a stage without one contributes nothing)."""
    samples: list[Sample] = []
    for stage in stages:
        try:
            samples += decode_shard(store.get(buffer_key(run_id, stage)))
        except ObjectNotFound:
            continue
    return samples
