"""Instruct stage: `parsed.files` → ShareGPT conversations → `instruction.samples`.

Every generator of `streams.generators` runs on each file (or book segment); each
candidate is then
1. validated as ShareGPT (`schemas.sharegpt`) with its Tekken token count against
   `sample_max_tokens` (`invalid_sharegpt`, `too_many_tokens`),
2. checked by Elixir on a pool of warm BEAM VMs: every `gpt` code block parses, refactor
   pairs compile on both sides, tests made from doctests pass against the file's code
   (`parse_failed`, `compile_failed`, `tests_failed`, `check_timeout`…).
A dropped candidate is recorded in the ledger (`sample_drops`, keyed by its id, so a
redelivery counts it once) and in `exforge_dropped_total`. Files come in batches of up to
`BATCH_FILES`; their valid candidates go to the pool in groups of one program per VM,
checked on a thread of their own while the next files are generated and validated (the
Python work and the VMs' overlap); a kept sample carries its token count, so the shard
stage does not tokenise it again.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core.db import SampleDrop, upsert
from exforge.core.settings import Settings
from exforge.core.store import ObjectNotFound, ObjectStore
from exforge.elixir.sandbox import SandboxConfig, SandboxPool
from schemas.records import InstructionSample, ParsedFile
from schemas.sharegpt import sharegpt_problems
from streams.generators import KINDS, Candidate, doc_to_code_samples, generate
from streams.generators.check import (
    CHECK_PRELUDE,
    PROGRAM_CANDIDATES,
    UnitResults,
    check_all,
)
from streams.generators.tokens import TokenCounter, token_counter
from streams.stage import Failure, Output, Result, StageContext, attach_batch_stage

__all__ = ["attach", "doc_to_code_samples", "file_text", "instruct"]


def file_text(file: ParsedFile, store: ObjectStore) -> str:
    """The file's content, inline or from the store (claim check)."""
    if file.content is not None:
        return file.content
    return store.get(file.content_ref or "").decode()


def validation_reason(
    sample: InstructionSample, count: TokenCounter, max_tokens: int
) -> str | None:
    return validated(sample, count, max_tokens)[0]


def validated(
    sample: InstructionSample, count: TokenCounter, max_tokens: int
) -> tuple[str | None, int | None]:
    """Why the sample is not valid ShareGPT (None: it is), and its token count (None
    when it was not counted)."""
    counted: list[int] = []

    def counting(turns: Sequence[dict[str, Any]]) -> int:
        counted.append(count(turns))
        return counted[-1]

    problems = sharegpt_problems(sample.sharegpt(), counting, max_tokens)
    return (problems[0].reason if problems else None), (counted[0] if counted else None)


@dataclass(frozen=True)
class Verdicts:
    kept: list[InstructionSample]
    dropped: list[tuple[InstructionSample, str]]


def instruct(
    candidates: Sequence[Candidate], pool: SandboxPool, count: TokenCounter, max_tokens: int
) -> Verdicts:
    """Validate, then check through the pool; keep or drop (with a reason) each one."""
    return instruct_files([candidates], pool, count, max_tokens)[0]


def instruct_files(
    files: Iterable[Sequence[Candidate]],
    pool: SandboxPool,
    count: TokenCounter,
    max_tokens: int,
    known: UnitResults | None = None,
) -> list[Verdicts]:
    """`instruct` for the candidates of several files, one `Verdicts` per file. Each
    file's candidates are validated as `files` yields them; the valid ones go to the
    pool in groups that fill a program per VM, checked on a thread of their own, so
    the pool checks one group while the next files are generated and validated (units
    whose results `known` holds are not run again). Kept samples carry their token
    count."""
    dropped: list[list[tuple[InstructionSample, str]]] = []
    kept: list[list[InstructionSample]] = []
    group_size = PROGRAM_CANDIDATES * pool.config.workers
    pending: list[tuple[int, Candidate]] = []
    groups: list[tuple[list[tuple[int, Candidate]], Future[list[str | None]]]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="instruct-check") as checker:

        def submit() -> None:
            group = pending.copy()
            pending.clear()
            checks = [c.checks for _, c in group]
            groups.append((group, checker.submit(check_all, pool, checks, known=known)))

        for index, candidates in enumerate(files):
            dropped.append([])
            kept.append([])
            for c in candidates:
                reason, tokens = validated(c.sample, count, max_tokens)
                if reason is None:
                    sample = c.sample.model_copy(update={"tokens": tokens})
                    pending.append((index, Candidate(sample, c.checks)))
                else:
                    dropped[index].append((c.sample, reason))
            if len(pending) >= group_size:
                submit()
        if pending:
            submit()
        for group, reasons in groups:
            for (index, c), reason in zip(group, reasons.result(), strict=True):
                if reason is None:
                    kept[index].append(c.sample)
                else:
                    dropped[index].append((c.sample, reason))
    return [Verdicts(k, d) for k, d in zip(kept, dropped, strict=True)]


def record_drops(engine: Engine, dropped: list[tuple[InstructionSample, str]]) -> None:
    """One `sample_drops` row per dropped sample (a redelivered drop rewrites its row)."""
    rows = [
        {
            "sample_id": sample.sample_id,
            "kind": sample.meta.kind,
            "reason": reason,
            "source_id": sample.meta.source_refs[0].source_id if sample.meta.source_refs else None,
        }
        for sample, reason in dropped
    ]
    with Session(engine) as session, session.begin():
        upsert(session, SampleDrop, rows)


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
            prelude=CHECK_PRELUDE,
        )
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()

    def get(self) -> SandboxPool:
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(self.config).__enter__()
                atexit.register(self._pool.close)
            return self._pool


BATCH_FILES = 64  # files whose candidates go to the pool together


def attach(ctx: StageContext) -> None:
    settings = ctx.settings
    kinds = wanted_kinds(settings)
    pool = LazyPool(settings)
    count = token_counter(settings.tokenizer_path)
    known = UnitResults()

    def handle(items: list[tuple[bytes, str | None]]) -> list[Result]:
        results = [Result() for _ in items]
        work: list[int] = []  # the items whose candidates were generated, in order

        def generated() -> Iterator[list[Candidate]]:
            for index, (value, _) in enumerate(items):
                try:
                    file = ParsedFile.model_validate_json(value)
                    candidates = generate(file, file_text(file, ctx.store), kinds)
                except (ValidationError, ObjectNotFound, UnicodeDecodeError) as exc:
                    results[index].failures.append(Failure.from_exception(exc))
                    continue
                work.append(index)
                yield candidates

        verdicts = instruct_files(generated(), pool.get(), count, settings.sample_max_tokens, known)
        drops = [drop for v in verdicts for drop in v.dropped]
        if drops:
            record_drops(ctx.engine, drops)
        for index, verdict in zip(work, verdicts, strict=True):
            result = results[index]
            result.outputs = [Output("instruction.samples", s.sample_id, s) for s in verdict.kept]
            for _, reason in verdict.dropped:
                result.drop(reason)
            result.count("files")
            result.count("samples", len(verdict.kept))
        return results

    attach_batch_stage(ctx, "instruct", "parsed.files", handle, max_batch=BATCH_FILES)
