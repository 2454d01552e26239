"""Instruction-sample generators: plain functions from an analysed file (or a book
segment) and its text to candidate samples, one `kind` each.

| kind | stage | from |
|---|---|---|
| `completion`, `fim` | 1 | whole files / modules; a definition as the middle |
| `doc_to_code`, `spec_to_code`, `code_to_doc`, `doctest_to_test` | 2 | functions, doctests |
| `otp_pattern` | 2 | GenServer/Supervisor/… modules, supervision trees |
| `refactor_pipes`, `refactor_pattern_match` | 2 | syntax-tree transformations |
| `book_qa` | 3 | book segments, in chapter-dependency order |

`generate` runs every generator that applies (or those named) and grades each sample
(stage of its kind, difficulty: `streams.generators.grade`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from schemas.records import InstructionSample, ParsedFile
from streams.generators.book import book_qa
from streams.generators.code import (
    code_to_doc,
    completion,
    doc_to_code,
    doctest_to_test,
    fim,
    spec_to_code,
)
from streams.generators.common import Candidate, Check
from streams.generators.grade import STAGES, graded
from streams.generators.otp import otp_pattern
from streams.generators.refactor import refactor_pattern_match, refactor_pipes

Generator = Callable[[ParsedFile, str], list[Candidate]]

CODE_GENERATORS: dict[str, Generator] = {
    "completion": completion,
    "fim": fim,
    "doc_to_code": doc_to_code,
    "spec_to_code": spec_to_code,
    "code_to_doc": code_to_doc,
    "doctest_to_test": doctest_to_test,
    "otp_pattern": otp_pattern,
    "refactor_pipes": refactor_pipes,
    "refactor_pattern_match": refactor_pattern_match,
}
BOOK_GENERATORS: dict[str, Generator] = {"book_qa": book_qa}
KINDS: tuple[str, ...] = (*CODE_GENERATORS, *BOOK_GENERATORS)

__all__ = ["KINDS", "STAGES", "Candidate", "Check", "doc_to_code_samples", "generate"]


def generate(file: ParsedFile, text: str, kinds: Iterable[str] | None = None) -> list[Candidate]:
    """Every graded candidate of the file, generator by generator, in a stable order."""
    wanted = set(KINDS if kinds is None else kinds)
    generators = BOOK_GENERATORS if file.kind == "book_segment" else CODE_GENERATORS
    return [
        Candidate(graded(c.sample, file, text), c.checks)
        for kind, generator in generators.items()
        if kind in wanted
        for c in generator(file, text)
    ]


def doc_to_code_samples(file: ParsedFile) -> list[InstructionSample]:
    """The `doc_to_code` samples of a file whose content is inline."""
    return [c.sample for c in generate(file, file.content or "", ["doc_to_code"])]
