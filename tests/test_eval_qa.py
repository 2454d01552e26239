"""Exact-answer benchmarks: the shipped OTP/idiom set and concept questions from books."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.records import BookSegment, ParsedFile
from workers.evaluator.benchmarks import BenchmarkError, Completion
from workers.evaluator.qa import MASK, concept_questions, load_concepts, load_idioms
from workers.evaluator.scoring import normalise_answer, score_exact

OTP = {"GenServer", "Supervisor", "Agent", "Task"}
IDIOMS = {"pipe chain", "with", "multi-clause pattern matching"}


def test_idiom_set_is_shipped_and_covers_otp_and_idioms() -> None:
    bench = load_idioms()
    assert bench.scoring == "exact" and len(bench.problems) >= 20
    answers = {p.answers[0] for p in bench.problems}
    assert answers >= OTP | IDIOMS
    for problem in bench.problems:
        assert problem.prompt.endswith("# Answer:") and problem.stop_tokens == ("\n",)
        assert "# Choices: " in problem.prompt


def test_idioms_score_exactly() -> None:
    bench = load_idioms()
    right = [Completion(p.name, f" {p.answers[0]}\n") for p in bench.problems]
    assert score_exact(bench, right, [1])["pass_at_k"]["1"] == 1.0
    by_name = bench.by_name()
    pipe = by_name["idiom_pipe_chain"]
    samples = [
        Completion(pipe.name, " `Pipe operator`."),  # an alias, quoted, with a dot
        Completion(pipe.name, " GenServer"),
        Completion(pipe.name, " pipe chain and more"),
    ]
    result = score_exact(bench, samples, [1, 3])
    problem = result["per_problem"][0]
    assert problem["statuses"] == ["passed", "failed", "failed"]
    assert result["pass_at_k"] == {"1": pytest.approx(1 / 3), "3": 1.0}
    assert result["compile_rate"] is None and result["unattempted"] == len(bench.problems) - 1


def test_answer_normalisation() -> None:
    assert normalise_answer("  `GenServer`.\nmore") == "genserver"
    assert normalise_answer("Multi-clause   pattern matching") == "multi-clause pattern matching"
    assert normalise_answer("") == ""


def segment(chapter: int, prose: str, concepts: list[str]) -> BookSegment:
    return BookSegment(
        book_title="Elixir in Action",
        chapter=chapter,
        chapter_title=f"Chapter {chapter}",
        page=10 * chapter,
        prose=prose,
        concepts=concepts,
    )


SEGMENTS = [
    segment(
        5,
        "A GenServer keeps state between calls. Start a GenServer with start_link.",
        ["GenServer", "supervision tree"],
    ),
    segment(6, "Links propagate exits; a supervisor restarts children.", ["supervisor"]),
    segment(7, "Nothing about the concept here.", ["ETS"]),
]


def test_concept_questions_mask_the_concept_and_score_exactly() -> None:
    bench = concept_questions(SEGMENTS)
    assert [p.answers for p in bench.problems] == [("GenServer",), ("supervisor",)]
    first = bench.problems[0]
    prose = first.prompt.splitlines()[1]
    assert prose == f"# A {MASK} keeps state between calls. Start a {MASK} with start_link."
    assert "# Choices: ETS, GenServer, supervision tree, supervisor" in first.prompt
    result = score_exact(
        bench,
        [Completion(first.name, " genserver"), Completion(bench.problems[1].name, " Task")],
    )
    assert [p["statuses"] for p in result["per_problem"]] == [["passed"], ["failed"]]


def test_concepts_load_from_parsed_book_segment_records(tmp_path: Path) -> None:
    parsed = [
        ParsedFile(
            sha256=f"{index:064x}",
            source_id="book:" + "0" * 64,
            path=f"chapter-{s.chapter:02d}/segment-001",
            kind="book_segment",
            content=s.prose,
            size_bytes=len(s.prose),
            lines=1,
            book=s,
        )
        for index, s in enumerate(SEGMENTS)
    ]
    path = tmp_path / "segments.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in parsed))
    bench = load_concepts(f"concepts:{path}")
    assert bench.name == "concepts-segments" and len(bench.problems) == 2
    path.write_text(json.dumps({"book_title": "x"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"segments\.jsonl:1"):
        load_concepts(f"concepts:{path}")
