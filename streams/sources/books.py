"""Programming books (PDF) → segments: chapters, code paired with its explanation,
concepts, a chapter dependency graph and difficulty levels.

PyMuPDF gives every text line with its font, size and position. Chapters and sections
come from the outline (or, without one, from lines set larger than the body text);
code is told from prose by a monospace font or by Elixir syntax (`iex>` sessions,
`defmodule`…); code lines are rebuilt byte-exact from the text plus the horizontal
offset (indentation) and the vertical gaps (blank lines). Each code block is paired with
the prose just before it (or after it, when it opens a section) — the concept-code
mapping. A chapter *introduces* the modules and functions it defines and the terms it
sets in bold; a later chapter that uses one of them, or names "Chapter N", depends on it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from exforge.core.store import sha256_hex
from schemas.records import BookSegment, ParsedFile, RawPackage
from streams.stage import BadMessage

MONO_FLAG = 8
BOLD_FLAG = 16
MONO_FONT = re.compile(r"courier|mono|consol|menlo|code", re.IGNORECASE)
ELIXIR_LINE = re.compile(r"^\s*(iex(\(\d+\))?>|\.\.\.(\(\d+\))?>|defmodule\s|defp?\s|end$)")
HEADING_RATIO = 1.25
DEFINITIONS = re.compile(r"\b(?:defmodule\s+([A-Z][\w.]*)|defp?\s+([a-z_][\w?!]*))")
CHAPTER_MENTION = re.compile(r"\bChapter\s+(\d+)\b")
# Constructs by the difficulty level they suggest (highest match wins).
LEVELS: tuple[tuple[int, re.Pattern[str]], ...] = (
    (5, re.compile(r"\b(defmacro|quote|unquote|__using__)\b")),
    (4, re.compile(r"\b(GenServer|Supervisor|handle_call|handle_cast|Application)\b")),
    (3, re.compile(r"\b(spawn|send|receive|Task\.|Agent\.|Stream\.)")),
    (2, re.compile(r"\b(case|cond|with|fn)\b|\|>|->|\bEnum\.")),
)


class NotABook(BadMessage):
    """The PDF cannot be opened or has no text."""


@dataclass
class Line:
    text: str
    page: int
    block: int
    x0: float
    y0: float
    height: float
    size: float
    mono: bool
    bold_terms: list[str]
    char_width: float


@dataclass
class CodeBlock:
    code: str
    language: Literal["elixir", "iex"]
    page: int


@dataclass
class Section:
    title: str | None
    items: list[str | CodeBlock] = field(default_factory=list)  # prose paragraphs, code


@dataclass
class Chapter:
    number: int
    title: str
    page: int
    sections: list[Section] = field(default_factory=list)
    bold_terms: list[str] = field(default_factory=list)

    @property
    def code_blocks(self) -> list[CodeBlock]:
        return [i for s in self.sections for i in s.items if isinstance(i, CodeBlock)]

    @property
    def text(self) -> str:
        return "\n".join(
            i if isinstance(i, str) else i.code for s in self.sections for i in s.items
        )


@dataclass
class Book:
    title: str
    chapters: list[Chapter]
    introduces: dict[int, list[str]]  # chapter number → concepts it introduces
    depends_on: dict[int, list[int]]  # chapter number → earlier chapters it uses


def _lines(document: object) -> list[Line]:
    lines = []
    for page_index, page in enumerate(document):  # type: ignore[attr-defined]
        for block in page.get_text("dict")["blocks"]:
            for line in block.get("lines", []):
                spans = [s for s in line["spans"] if s["text"]]
                if not spans or not "".join(s["text"] for s in spans).strip():
                    continue
                visible = [s for s in spans if s["text"].strip()]
                mono = all(s["flags"] & MONO_FLAG or MONO_FONT.search(s["font"]) for s in visible)
                text = "".join(s["text"] for s in spans)
                first = spans[0]
                width = first["bbox"][2] - first["bbox"][0]
                lines.append(
                    Line(
                        text=text,
                        page=page_index + 1,
                        block=block["number"],
                        x0=first["bbox"][0],
                        y0=line["bbox"][1],
                        height=line["bbox"][3] - line["bbox"][1],
                        size=max(s["size"] for s in spans),
                        mono=bool(mono),
                        bold_terms=[s["text"].strip() for s in visible if s["flags"] & BOLD_FLAG],
                        char_width=width / max(1, len(first["text"])),
                    )
                )
    return lines


def _is_code(line: Line) -> bool:
    return line.mono or bool(ELIXIR_LINE.match(line.text))


def _code_block(lines: list[Line]) -> CodeBlock:
    """Rebuild code byte-exact: indentation from x offsets (plus spaces kept in the text),
    blank lines from vertical gaps of whole line pitches."""
    left = min(line.x0 for line in lines)
    out: list[str] = []
    for index, line in enumerate(lines):
        if index:
            previous = lines[index - 1]
            if line.page == previous.page and previous.height > 0:
                blanks = round((line.y0 - previous.y0) / previous.height) - 1
                out.extend([""] * max(0, blanks))
        shift = round((line.x0 - left) / line.char_width) if line.char_width else 0
        out.append(" " * max(0, shift) + line.text.rstrip())
    code = "\n".join(out)
    first = code.lstrip()
    language: Literal["elixir", "iex"] = "iex" if first.startswith("iex") else "elixir"
    return CodeBlock(code, language, lines[0].page)


def _body_size(lines: list[Line]) -> float:
    sizes = Counter[float]()
    for line in lines:
        if not line.mono:
            sizes[round(line.size, 1)] += len(line.text)
    return sizes.most_common(1)[0][0] if sizes else 10.0


def _headings(document: object, lines: list[Line]) -> dict[int, tuple[int, str]]:
    """Line index → (level, title) for chapter (1) and section (2) headings."""
    toc = document.get_toc(simple=True)  # type: ignore[attr-defined]
    found: dict[int, tuple[int, str]] = {}
    if toc:
        start = 0
        for level, title, page in toc:
            for index in range(start, len(lines)):
                line = lines[index]
                if line.page >= page and line.text.strip() == title.strip():
                    found[index] = (min(level, 2), title.strip())
                    start = index + 1
                    break
        return found
    body = _body_size(lines)
    sizes = sorted(
        {round(x.size, 1) for x in lines if x.size >= body * HEADING_RATIO}, reverse=True
    )
    for index, line in enumerate(lines):
        size = round(line.size, 1)
        if size in sizes and not line.mono:
            found[index] = (1 if size == sizes[0] else 2, line.text.strip())
    return found


def _structure(lines: list[Line], headings: dict[int, tuple[int, str]]) -> list[Chapter]:
    chapters: list[Chapter] = []
    code: list[Line] = []
    prose: list[Line] = []

    def flush() -> None:
        if not chapters:
            code.clear()
            prose.clear()
            return
        items = chapters[-1].sections[-1].items
        if prose:
            items.append(" ".join(line.text.strip() for line in prose))
            prose.clear()
        if code:
            items.append(_code_block(code))
            code.clear()

    for index, line in enumerate(lines):
        heading = headings.get(index)
        if heading is not None:
            flush()
            level, title = heading
            if level == 1 or not chapters:
                chapters.append(Chapter(len(chapters) + 1, title, line.page, [Section(None)]))
            if level == 2:
                chapters[-1].sections.append(Section(title))
            continue
        if _is_code(line):
            if prose:
                flush()
            code.append(line)
        else:
            if code or (prose and prose[-1].block != line.block):
                flush()
            prose.append(line)
            if chapters:
                chapters[-1].bold_terms.extend(t for t in line.bold_terms if t)
    flush()
    for chapter in chapters:
        chapter.sections = [s for s in chapter.sections if s.items]
    return chapters


def _concepts(chapter: Chapter) -> list[str]:
    """What a chapter defines (modules, functions) and the terms it sets in bold."""
    defined = []
    for block in chapter.code_blocks:
        for module, function in DEFINITIONS.findall(block.code):
            defined.append(module or function)
    return list(dict.fromkeys(defined + chapter.bold_terms))


def _mentions(text: str, concept: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(concept)}(?![\w?!])", text) is not None


def _dependencies(
    chapters: list[Chapter], introduces: dict[int, list[str]]
) -> dict[int, list[int]]:
    graph: dict[int, list[int]] = {}
    for chapter in chapters:
        text = chapter.text
        earlier = {
            c.number
            for c in chapters[: chapter.number - 1]
            if any(_mentions(text, concept) for concept in introduces[c.number])
        }
        earlier |= {int(n) for n in CHAPTER_MENTION.findall(text) if 0 < int(n) < chapter.number}
        graph[chapter.number] = sorted(earlier)
    return graph


def extract_book(pdf: bytes, title: str | None = None) -> Book:
    """Chapters, sections, code blocks, concepts and dependencies of a PDF book."""
    import pymupdf

    try:
        document = pymupdf.open(stream=pdf, filetype="pdf")
    except Exception as exc:  # PyMuPDF raises its own FileDataError and RuntimeErrors
        raise NotABook(f"cannot open the PDF: {exc}") from exc
    with document:
        lines = _lines(document)
        if not lines:
            raise NotABook("the PDF has no text layer")
        chapters = _structure(lines, _headings(document, lines))
        book_title = title or document.metadata.get("title") or "untitled"
    seen: set[str] = set()
    introduces: dict[int, list[str]] = {}
    for chapter in chapters:
        introduces[chapter.number] = [c for c in _concepts(chapter) if c not in seen]
        seen.update(introduces[chapter.number])
    return Book(book_title, chapters, introduces, _dependencies(chapters, introduces))


def difficulty(text: str) -> int:
    """1 (basics) to 5 (metaprogramming), by the most advanced construct used."""
    return next((level for level, pattern in LEVELS if pattern.search(text)), 1)


def _segments(chapter: Chapter) -> list[tuple[str | None, str, CodeBlock | None]]:
    """(section, explaining prose, code) per code block; prose-only sections as one."""
    out: list[tuple[str | None, str, CodeBlock | None]] = []
    for section in chapter.sections:
        pending: list[str] = []
        blocks = [i for i in section.items if isinstance(i, CodeBlock)]
        for position, item in enumerate(section.items):
            if isinstance(item, str):
                pending.append(item)
                continue
            if not pending:  # a section opening with code: explained by what follows
                for after in section.items[position + 1 :]:
                    if not isinstance(after, str):
                        break
                    pending.append(after)
            out.append((section.title, "\n\n".join(pending), item))
            pending = []
        if not blocks:
            out.append((section.title, "\n\n".join(pending), None))
    return out


def segment_markdown(
    chapter: Chapter, section: str | None, prose: str, code: CodeBlock | None
) -> str:
    heading = f"# {chapter.title}" + (f"\n\n## {section}" if section else "")
    body = f"\n\n{prose}" if prose else ""
    fence = f"\n\n```{code.language}\n{code.code}\n```" if code else ""
    return f"{heading}{body}{fence}\n"


def book_files(package: RawPackage, pdf: bytes) -> list[ParsedFile]:
    """Every segment of a book as a `ParsedFile` of kind `book_segment`, content inline
    and not yet cleaned (`streams.files.cleaned_book_segment` redacts, checks and bands it)."""
    book = extract_book(pdf, package.metadata.get("title") or package.name)
    files = []
    for chapter in book.chapters:
        chapter_code = "\n".join(block.code for block in chapter.code_blocks)
        chapter_level = difficulty(chapter_code or chapter.text)
        earlier = [c for n in book.depends_on[chapter.number] for c in book.introduces[n]]
        for index, (section, prose, code) in enumerate(_segments(chapter), start=1):
            content = segment_markdown(chapter, section, prose, code)
            encoded = content.encode()
            text = prose + ("\n" + code.code if code else "")
            files.append(
                ParsedFile(
                    sha256=sha256_hex(encoded),
                    source_id=package.source_id,
                    path=f"chapter-{chapter.number:02d}/segment-{index:03d}",
                    license=package.license,
                    kind="book_segment",
                    content=content,
                    size_bytes=len(encoded),
                    lines=content.count("\n"),
                    book=BookSegment(
                        book_title=book.title,
                        chapter=chapter.number,
                        chapter_title=chapter.title,
                        section=section,
                        page=code.page if code else chapter.page,
                        prose=prose,
                        code=code.code if code else None,
                        code_language=code.language if code else None,
                        concepts=[c for c in book.introduces[chapter.number] if _mentions(text, c)],
                        references=[c for c in earlier if _mentions(text, c)],
                        depends_on=book.depends_on[chapter.number],
                        difficulty=difficulty(code.code if code else prose),
                        chapter_difficulty=chapter_level,
                    ),
                )
            )
    return files
