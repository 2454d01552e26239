"""Curriculum stage per kind and a deterministic difficulty score (1-5).

Difficulty is computed from the analysis features of the code a sample teaches (its
`gpt` code blocks, analysed like any file) and the concepts it involves:

    points = min(branches, 8) / 4              # extra clauses, case/cond/if, and/or… (0-2)
           + min(max(depth - 2, 0), 2) / 2     # do-block/fn nesting beyond two levels (0-1)
           + 1    if it uses OTP or processes  # behaviours, supervisors, spawn/send/receive
           + 1.5  if it defines or expands macros (defmacro, quote, unquote)
           + 0.5  if it is longer than 40 lines of code
           + min(concepts, 4) / 4              # concepts the sample names (0-1)
    difficulty = clamp(1 + floor(points), 1, 5)

`branches` is the analysis' `complexity - 1`; a book segment keeps at least the level the
book extraction gave it.
"""

from __future__ import annotations

import math
from functools import lru_cache

from exforge.elixir.analysis import definitions
from exforge.elixir.features import Grading, grading, grading_of, nesting
from exforge.elixir.tree import parsed
from schemas.records import ElixirAnalysis, InstructionSample, ParsedFile
from streams.generators.common import code_blocks, code_bytes

STAGES: dict[str, int] = {
    "completion": 1,
    "fim": 1,
    "doc_to_code": 2,
    "spec_to_code": 2,
    "code_to_doc": 2,
    "doctest_to_test": 2,
    "otp_pattern": 2,
    "refactor_pipes": 2,
    "refactor_pattern_match": 2,
    "book_qa": 3,
}


def points(grading: Grading, concepts: int) -> float:
    return (
        min(grading.complexity - 1, 8) / 4
        + min(max(grading.nesting - 2, 0), 2) / 2
        + (1.0 if grading.otp else 0.0)
        + (1.5 if grading.macros else 0.0)
        + (0.5 if grading.loc > 40 else 0.0)
        + min(concepts, 4) / 4
    )


def _level(grading: Grading, concepts: int, floor: int) -> int:
    return max(floor, min(5, 1 + math.floor(points(grading, concepts))))


def score(features: ElixirAnalysis, data: bytes, concepts: int, floor: int) -> int:
    """The difficulty of code with these features; its bytes, `data`, are parsed only
    when the features lack its nesting (a record another producer made, or one from
    before the analysis measured it)."""
    depth = features.metrics.nesting
    if depth is None:
        depth = nesting(parsed(data))
    return _level(grading_of(features, depth), concepts, floor)


@lru_cache(maxsize=4096)
def difficulty(code: str, concepts: int, floor: int = 1) -> int:
    """The score of `code` (graded once; kinds that teach the same code share it): the
    features of its analysis that a score reads (`grading`, not the whole analysis)."""
    source, data = code_bytes(code)
    root = parsed(data)  # the refactorings of a function parse its source too
    return _level(grading(source, data, root, definitions(data, root)), concepts, floor)


def graded(sample: InstructionSample, file: ParsedFile, text: str) -> InstructionSample:
    """The sample with the stage of its kind and its difficulty. Code that is the whole
    of the file's `text` keeps the analysis the parse stage made of that same text."""
    code = "\n\n".join(
        block
        for turn in sample.conversations
        if turn.from_ == "gpt"
        for block in code_blocks(turn.value)
    )
    floor = file.book.difficulty if file.book is not None else 1
    concepts = len(sample.meta.concepts)
    source, data = code_bytes(code)
    if file.kind == "elixir_file" and source == text:
        level = score(file.analysis, data, concepts, floor)
    else:
        level = difficulty(code, concepts, floor)
    meta = sample.meta.model_copy(update={"stage": STAGES[sample.meta.kind], "difficulty": level})
    return sample.model_copy(update={"meta": meta})
