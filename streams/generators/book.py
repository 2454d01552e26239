"""`book_qa` (stage 3): a concept question answered with the book's explanation and code.

The curriculum order follows the book's chapter dependency graph: a segment's
`meta.position` ranks it after every chapter its chapter builds on (`depends_on` only
names earlier chapters, so chapter order is a topological order of the graph; segments
keep their order inside a chapter), so sorting by position never teaches a concept
before the ones it depends on.
"""

from __future__ import annotations

import re

from schemas.records import BookSegment, ParsedFile
from streams.generators.common import Candidate, Check, candidate, fenced, ref

IEX_PROMPT = re.compile(r"^\s*(?:iex|\.\.\.)(?:\(\d+\))?>\s?(.*)$")


def iex_expressions(session: str) -> str:
    """The expressions typed in an `iex>` session (results dropped), for checking."""
    return "\n".join(m.group(1) for line in session.splitlines() if (m := IEX_PROMPT.match(line)))


def position(segment: BookSegment, path: str) -> int:
    """Chapter, then segment number (`chapter-NN/segment-NNN`), as one sortable rank."""
    if any(dep >= segment.chapter for dep in segment.depends_on):
        raise ValueError(f"chapter {segment.chapter} depends on a later chapter")
    number = re.search(r"segment-(\d+)", path)
    return segment.chapter * 1000 + (int(number.group(1)) if number else 0)


def question(segment: BookSegment) -> str:
    topic = segment.section or segment.chapter_title
    about = f" ({', '.join(f'`{c}`' for c in segment.concepts)})" if segment.concepts else ""
    return (
        f"Explain \u201c{topic}\u201d{about} in Elixir, as chapter {segment.chapter} "
        f"(\u201c{segment.chapter_title}\u201d) of *{segment.book_title}* does, with an example."
    )


def answer(segment: BookSegment) -> tuple[str, list[Check]]:
    if segment.code is None:
        return segment.prose, []
    if segment.code_language == "iex":
        block = f"```iex\n{segment.code.rstrip()}\n```"
        return f"{segment.prose}\n\n{block}", [Check(iex_expressions(segment.code))]
    return f"{segment.prose}\n\n{fenced(segment.code)}", [Check(segment.code)]


def book_qa(file: ParsedFile, text: str) -> list[Candidate]:
    segment = file.book
    if segment is None or not segment.prose.strip():
        return []
    gpt, checks = answer(segment)
    made = candidate(
        "book_qa",
        [("human", question(segment)), ("gpt", gpt)],
        file,
        [ref(file)],
        concepts=[*segment.concepts, *segment.references],
        checks=checks,
    )
    meta = made.sample.meta.model_copy(update={"position": position(segment, file.path)})
    return [Candidate(made.sample.model_copy(update={"meta": meta}), made.checks)]
