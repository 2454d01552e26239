"""Exact-answer benchmarks: OTP/idiom recognition and concept questions from books.

Both are `Benchmark`s with `scoring="exact"`: the model continues a prompt that ends in
`# Answer:`, the first line of its continuation is compared (case- and quote-insensitive)
with the accepted answers. The idiom set ships as package data (`data/idioms.jsonl`:
code, the behaviour or idiom it shows, accepted aliases); concept questions are cloze
questions made from `book_segment` records: a concept the segment's chapter introduces is
masked in the segment's prose, and the model names it from the book's concepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.records import BookSegment, ParsedFile
from workers.evaluator.benchmarks import Benchmark, BenchmarkError, Problem, _json_lines

IDIOMS = "idioms"
IDIOMS_PATH = Path(__file__).with_name("data") / "idioms.jsonl"
CONCEPTS_PREFIX = "concepts:"
ANSWER_STOPS = ("\n",)
MASK = "____"


def _question(
    name: str, category: str, body: str, choices: Iterable[str], answers: Iterable[str]
) -> Problem:
    prompt = f"{body}\n# Choices: {', '.join(choices)}\n# Answer:"
    return Problem(
        name=name,
        language="text",
        prompt=prompt,
        tests="",
        stop_tokens=ANSWER_STOPS,
        category=category,
        reference=next(iter(answers)),
        answers=tuple(answers),
    )


def _commented(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines())


def load_idioms(path: Path = IDIOMS_PATH) -> Benchmark:
    """Given Elixir code, name the OTP behaviour or idiom it uses."""
    records = [record for _, record in _json_lines(path)]
    choices = sorted({record["answer"] for record in records}, key=str.lower)
    problems = tuple(
        _question(
            record["name"],
            record["category"],
            "# Which OTP behaviour or Elixir idiom does this code use?\n"
            f"{_commented(record['code'])}",
            choices,
            [record["answer"], *record.get("aliases", [])],
        )
        for record in records
    )
    return Benchmark(IDIOMS, problems, scoring="exact")


def _segment(record: dict[str, Any]) -> BookSegment | None:
    """A BookSegment from a `ParsedFile` (kind book_segment) or a bare segment record."""
    try:
        if "book" in record or "kind" in record:
            parsed = ParsedFile.model_validate(record)
            return parsed.book if parsed.kind == "book_segment" else None
        return BookSegment.model_validate(record)
    except ValidationError as exc:
        raise BenchmarkError(f"not a book segment: {exc.errors()[0]['msg']}") from None


def load_segments(path: Path) -> list[BookSegment]:
    segments = []
    for number, record in _json_lines(path):
        try:
            segment = _segment(record)
        except BenchmarkError as exc:
            raise BenchmarkError(f"{path}:{number}: {exc}") from None
        if segment is not None:
            segments.append(segment)
    return segments


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def concept_questions(segments: Iterable[BookSegment], name: str = "concepts") -> Benchmark:
    """One cloze question per (segment, concept its chapter introduces and its prose names)."""
    segments = list(segments)
    problems: list[Problem] = []
    for segment in segments:
        choices = sorted(
            {c for s in segments if s.book_title == segment.book_title for c in s.concepts},
            key=str.lower,
        )
        for concept in segment.concepts:
            pattern = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
            if not pattern.search(segment.prose):
                continue
            body = (
                f"# From {segment.book_title}, chapter {segment.chapter} "
                f"({segment.chapter_title}):\n{_commented(pattern.sub(MASK, segment.prose))}\n"
                f"# Which concept is masked as {MASK}?"
            )
            problems.append(
                _question(
                    f"concept_c{segment.chapter}_p{segment.page}_{len(problems)}_{_slug(concept)}",
                    f"chapter {segment.chapter}",
                    body,
                    choices,
                    [concept],
                )
            )
    if not problems:
        raise BenchmarkError("no concept questions: no segment's prose names its concepts")
    return Benchmark(name, tuple(problems), scoring="exact")


def load_concepts(source: str) -> Benchmark:
    """`concepts:PATH`, PATH a JSONL of book_segment ParsedFile records or BookSegments."""
    path = Path(source.removeprefix(CONCEPTS_PREFIX))
    return concept_questions(load_segments(path), f"concepts-{path.stem}")
