"""Instruct stage: `parsed.files` → ShareGPT conversations → `instruction.samples`.

Every generator of `streams.generators` runs on each file (or book segment); each
candidate is then
1. validated as ShareGPT (`schemas.sharegpt`) with its Tekken token count against
   `sample_max_tokens` (`invalid_sharegpt`, `too_many_tokens`),
2. checked by Elixir on a pool of warm BEAM VMs: every `gpt` code block parses, refactor
   pairs compile on both sides, tests made from doctests pass against the file's code
   (`parse_failed`, `compile_failed`, `tests_failed`, `check_timeout`…).
A dropped candidate is recorded in the ledger (`sample_drops`, keyed by its id, so a
redelivery counts it once) and in `exforge_dropped_total`.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core.db import SampleDrop
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.elixir.sandbox import SandboxConfig, SandboxPool
from schemas.records import InstructionSample, ParsedFile
from schemas.sharegpt import sharegpt_problems
from streams.generators import KINDS, Candidate, doc_to_code_samples, generate
from streams.generators.check import check_all
from streams.generators.tokens import TokenCounter, token_counter
from streams.stage import Output, Result, StageContext, attach_stage

__all__ = ["attach", "doc_to_code_samples", "file_text", "instruct"]


def file_text(file: ParsedFile, store: ObjectStore) -> str:
    """The file's content, inline or from the store (claim check)."""
    if file.content is not None:
        return file.content
    return store.get(file.content_ref or "").decode()


def validation_reason(
    sample: InstructionSample, count: TokenCounter, max_tokens: int
) -> str | None:
    problems = sharegpt_problems(sample.sharegpt(), count, max_tokens)
    return problems[0].reason if problems else None


@dataclass(frozen=True)
class Verdicts:
    kept: list[InstructionSample]
    dropped: list[tuple[InstructionSample, str]]


def instruct(
    candidates: Sequence[Candidate], pool: SandboxPool, count: TokenCounter, max_tokens: int
) -> Verdicts:
    """Validate, then check through the pool; keep or drop (with a reason) each one."""
    dropped: list[tuple[InstructionSample, str]] = []
    valid: list[Candidate] = []
    for c in candidates:
        reason = validation_reason(c.sample, count, max_tokens)
        if reason is None:
            valid.append(c)
        else:
            dropped.append((c.sample, reason))
    reasons = check_all(pool, [c.checks for c in valid])
    kept = [c.sample for c, r in zip(valid, reasons, strict=True) if r is None]
    dropped += [(c.sample, r) for c, r in zip(valid, reasons, strict=True) if r is not None]
    return Verdicts(kept, dropped)


def record_drops(engine: Engine, dropped: list[tuple[InstructionSample, str]]) -> None:
    with Session(engine) as session, session.begin():
        for sample, reason in dropped:
            refs = sample.meta.source_refs
            session.merge(
                SampleDrop(
                    sample_id=sample.sample_id,
                    kind=sample.meta.kind,
                    reason=reason,
                    source_id=refs[0].source_id if refs else None,
                )
            )


def wanted_kinds(settings: Settings) -> list[str]:
    named = [k.strip() for k in settings.instruct_kinds.split(",") if k.strip()]
    unknown = set(named) - set(KINDS)
    if unknown:
        raise ValueError(f"EXFORGE_INSTRUCT_KINDS: unknown kinds {sorted(unknown)}")
    return named or list(KINDS)


class LazyPool:
    """The check pool, booted on first use by whichever thread needs it first."""

    def __init__(self, settings: Settings) -> None:
        self.config = SandboxConfig(
            timeout_s=settings.eval_timeout_s,
            memory_mb=settings.eval_memory_mb,
            workers=settings.check_workers,
            # Corpus code is checked also where the kernel refuses namespaces (containers
            # without user namespaces); evaluation of model output refuses instead.
            allow_unisolated=True,
        )
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()

    def get(self) -> SandboxPool:
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(self.config).__enter__()
                atexit.register(self._pool.close)
            return self._pool


def attach(ctx: StageContext) -> None:
    settings = ctx.settings
    kinds = wanted_kinds(settings)
    pool = LazyPool(settings)
    count = token_counter(settings.tokenizer_path)

    def handle(value: bytes, key: str | None) -> Result:
        file = ParsedFile.model_validate_json(value)
        candidates = generate(file, file_text(file, ctx.store), kinds)
        verdicts = instruct(candidates, pool.get(), count, settings.sample_max_tokens)
        result = Result(
            outputs=[Output("instruction.samples", s.sample_id, s) for s in verdicts.kept]
        )
        if verdicts.dropped:
            record_drops(ctx.engine, verdicts.dropped)
        for _, reason in verdicts.dropped:
            result.drop(reason)
        return result

    attach_stage(ctx, "instruct", "parsed.files", handle)
