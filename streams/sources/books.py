"""Programming books (PDF) → segments: chapters, code paired with its explanation,
concepts, a chapter dependency graph and difficulty levels.

PyMuPDF gives every text line with its font, size and position. Page furniture goes
first: running heads and footers (lines at the top or bottom of a page whose text
repeats at the same height across pages; once such a position is established, every
line there) and page numbers, so that a paragraph or a code block that crosses a page
break reads on as one. Chapters and sections come from the outline (matched to heading
lines by their normalised text) or, without one or when less than half of it is found
in the text, from lines set larger than the body text (with a warning); a book without
any heading is one chapter (with a warning), so a book with text never yields nothing
without saying why. Code is told from prose by a monospace font or by Elixir syntax
(`iex>` sessions, `defmodule`…); code lines are rebuilt byte-exact from the text plus
the horizontal offset from the page's margin (indentation; left and right pages may have
different margins) and the vertical gaps (blank lines). Each code block is paired with
the prose just before it (or after it, when it opens a section) — the concept-code
mapping. A chapter *introduces* the modules and functions it defines and the terms it
sets in bold; a later chapter that uses one of them, or names "Chapter N", depends on it.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter, defaultdict
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
EDGE_LINES = 2  # lines at each end of a page that can be a running head, footer or number
RUNNING_PAGES = 3  # pages a running head repeats on (two in a book of up to three pages)
SLOT_PT = 2.0  # heights closer than this are one position
ISOLATION = 1.5  # a gap of this many line heights sets a running head apart from the body
PAGE_NUMBER = re.compile(
    r"(?i)^\s*(?:page\s+)?(?:\d{1,4}|(?=[ivxlcdm]+\s*$)m{0,3}(?:cm|cd|d?c{0,3})"
    r"(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3}))(?:\s+of\s+\d{1,4})?\s*$"
    r"|^\s*[-\u2013\u2014]\s*\d{1,4}\s*[-\u2013\u2014]\s*$"
)
TITLE_NUMBERING = re.compile(r"^(?:chapter|part|section|appendix)?\s*[\divxlc]+(?:\.\d+)*[.:)]?\s+")
SENTENCE_END = (".", "!", "?", ":", '"', "\u201d")
MIN_OUTLINE_MATCH = 0.5
log = logging.getLogger("exforge.sources.books")
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
    """The PDF cannot be opened, has no text, or its text yields no segment."""


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
    warnings: list[str] = field(default_factory=list)  # what extraction could not trust


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


def _shape(text: str) -> str:
    """A line's text with its numbers blanked (`Chapter 3 · 41` repeats as a shape)."""
    return re.sub(r"\d+", "#", " ".join(text.split()))


def _slot(line: Line) -> int:
    return round(line.y0 / SLOT_PT)


@dataclass(frozen=True)
class _Edge:
    """A line at the top or bottom of its page that may be page furniture."""

    index: int
    band: str  # "top" | "bottom"
    isolated: bool  # set apart from the body by more than a line's pitch


def _edges(lines: list[Line]) -> list[_Edge]:
    """The lines among the first and last `EDGE_LINES` of each page that may be
    furniture: not code (an `end` or an `iex` result may well close a page) and not set
    larger than the body text (headings)."""
    body = _body_size(lines)
    pages: dict[int, list[int]] = defaultdict(list)
    for index, line in enumerate(lines):
        pages[line.page].append(index)
    edges: list[_Edge] = []
    for indexes in pages.values():
        ordered = sorted(indexes, key=lambda i: lines[i].y0)
        for position, index in enumerate(ordered):
            line = lines[index]
            band = "top" if position < EDGE_LINES else "bottom"
            if EDGE_LINES <= position < len(ordered) - EDGE_LINES:
                continue
            if line.mono or round(line.size, 1) > body:
                continue
            step = 1 if band == "top" else -1
            neighbour = position + step
            if 0 <= neighbour < len(ordered):
                gap = abs(lines[ordered[neighbour]].y0 - line.y0)
                isolated = gap >= ISOLATION * max(line.height, 1.0)
            else:
                isolated = True
            edges.append(_Edge(index, band, isolated))
    return edges


def page_furniture(lines: list[Line]) -> set[int]:
    """Indexes of running heads, footers and page numbers.

    Candidates are the edge lines (`_edges`). A position (top or bottom, height) holds
    running heads or footers once, on `RUNNING_PAGES` pages, some text shape repeats
    there, or candidates there stand apart from the body (and most candidates there
    do: the first line of the body also sits at one height on many pages, but runs on
    at a line's pitch). Then every candidate there is furniture, whatever its text
    (chapter titles as running heads change). A candidate that is only a page number
    (`12`, `xiv`, `Page 3 of 9`, `- 4 -`) is furniture anywhere.
    """
    edges = _edges(lines)
    needed = min(RUNNING_PAGES, max(2, len({line.page for line in lines}) - 1))
    shapes: dict[tuple[str, int], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    pages: dict[tuple[str, int], set[int]] = defaultdict(set)
    apart: dict[tuple[str, int], set[int]] = defaultdict(set)
    for edge in edges:
        line = lines[edge.index]
        position = (edge.band, _slot(line))
        shapes[position][_shape(line.text)].add(line.page)
        pages[position].add(line.page)
        if edge.isolated:
            apart[position].add(line.page)
    running = {
        position
        for position, by_shape in shapes.items()
        if any(len(found) >= needed for found in by_shape.values())
        or (len(apart[position]) >= needed and 2 * len(apart[position]) >= len(pages[position]))
    }
    return {
        edge.index
        for edge in edges
        if (edge.band, _slot(lines[edge.index])) in running
        or PAGE_NUMBER.match(lines[edge.index].text)
    }


def _margins(lines: list[Line]) -> dict[int, float]:
    """Left margin by page parity (left and right pages may differ): where prose starts,
    or any text where a parity has no prose."""
    margins: dict[int, float] = {}
    for parity in (0, 1):
        side = [line for line in lines if line.page % 2 == parity]
        prose = [line.x0 for line in side if not line.mono]
        if prose or side:
            margins[parity] = min(prose or [line.x0 for line in side])
    return margins


def _is_code(line: Line) -> bool:
    return line.mono or bool(ELIXIR_LINE.match(line.text))


def _code_block(lines: list[Line], margins: dict[int, float]) -> CodeBlock:
    """Rebuild code byte-exact: indentation from x offsets from the page's margin (plus
    spaces kept in the text), blank lines from vertical gaps of whole line pitches within
    a page (a page break shows none)."""
    offsets = [line.x0 - margins.get(line.page % 2, 0.0) for line in lines]
    left = min(offsets)
    out: list[str] = []
    for index, line in enumerate(lines):
        if index:
            previous = lines[index - 1]
            if line.page == previous.page and previous.height > 0:
                blanks = round((line.y0 - previous.y0) / previous.height) - 1
                out.extend([""] * max(0, blanks))
        shift = round((offsets[index] - left) / line.char_width) if line.char_width else 0
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


def _title_key(text: str) -> str:
    """A heading's text as the outline and the page may both spell it: compatibility
    forms, case, spacing, and a leading number (`Chapter 3`, `2.1`) set aside."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return TITLE_NUMBERING.sub("", text).strip(" .:") or text


def _outline_headings(toc: list[list], lines: list[Line]) -> tuple[dict[int, tuple[int, str]], int]:
    """Line index → (level, title) of the outline entries found in order, and how many
    entries there were."""
    keys = [_title_key(line.text) for line in lines]
    found: dict[int, tuple[int, str]] = {}
    start = 0
    for level, title, page in toc:
        wanted = _title_key(title)
        for index in range(start, len(lines)):
            if lines[index].page >= page and keys[index] == wanted:
                found[index] = (min(level, 2), title.strip())
                start = index + 1
                break
    return found, len(toc)


def _font_headings(lines: list[Line]) -> dict[int, tuple[int, str]]:
    """Headings by size: the largest size above the body's is a chapter, the others
    sections."""
    body = _body_size(lines)
    sizes = sorted(
        {round(x.size, 1) for x in lines if x.size >= body * HEADING_RATIO}, reverse=True
    )
    found: dict[int, tuple[int, str]] = {}
    for index, line in enumerate(lines):
        size = round(line.size, 1)
        if size in sizes and not line.mono:
            found[index] = (1 if size == sizes[0] else 2, line.text.strip())
    return found


def _headings(
    document: object, lines: list[Line], warnings: list[str]
) -> dict[int, tuple[int, str]]:
    """Line index → (level, title) for chapter (1) and section (2) headings."""
    toc = document.get_toc(simple=True)  # type: ignore[attr-defined]
    if toc:
        found, entries = _outline_headings(toc, lines)
        if len(found) >= MIN_OUTLINE_MATCH * entries:
            if len(found) < entries:
                warnings.append(f"{entries - len(found)} of {entries} outline entries not found")
            return found
        warnings.append(
            f"the outline does not match the text ({len(found)} of {entries} entries "
            "found): headings taken from font sizes"
        )
    return _font_headings(lines)


def _new_paragraph(previous: Line, line: Line) -> bool:
    """A new text block starts a paragraph, except on a new page after a line that does
    not end a sentence (the paragraph crosses the page break)."""
    if line.page != previous.page:
        return previous.text.rstrip().endswith(SENTENCE_END)
    return line.block != previous.block


def _structure(
    lines: list[Line],
    headings: dict[int, tuple[int, str]],
    margins: dict[int, float],
    opening: str | None = None,
) -> list[Chapter]:
    """Chapters of sections of prose paragraphs and code blocks; text before the first
    heading is front matter and left out, unless an `opening` chapter title is given."""
    chapters = [Chapter(1, opening, lines[0].page, [Section(None)])] if opening else []
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
            items.append(_code_block(code, margins))
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
            if code or (prose and _new_paragraph(prose[-1], line)):
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
    warnings: list[str] = []
    with document:
        every = _lines(document)
        if not every:
            raise NotABook("the PDF has no text layer")
        furniture = page_furniture(every)
        lines = [line for index, line in enumerate(every) if index not in furniture]
        if not lines:
            raise NotABook("the PDF has only running heads, footers and page numbers")
        headings = _headings(document, lines, warnings)
        book_title = title or document.metadata.get("title") or "untitled"
    opening = None
    if not headings:
        warnings.append("no headings found: the whole text is one chapter")
        opening = book_title
    chapters = _structure(lines, headings, _margins(lines), opening)
    if not any(chapter.sections for chapter in chapters):
        raise NotABook("the headings found enclose no text (only front matter before them)")
    seen: set[str] = set()
    introduces: dict[int, list[str]] = {}
    for chapter in chapters:
        introduces[chapter.number] = [c for c in _concepts(chapter) if c not in seen]
        seen.update(introduces[chapter.number])
    for warning in warnings:
        log.warning("%s: %s", book_title, warning)
    return Book(book_title, chapters, introduces, _dependencies(chapters, introduces), warnings)


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
