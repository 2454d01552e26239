"""Book extraction on PDFs generated here with PyMuPDF: outline, serif prose, monospace
code, `iex>` sessions, and a chapter that builds on an earlier one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pymupdf
import pytest

from exforge.core.store import sha256_hex
from schemas.records import RawPackage
from streams.sources.books import NotABook, book_files, extract_book
from tests.support.records import raw_package

GREETER = """defmodule Greeter do
  @moduledoc "Greets people."

  def hello(name) do
    "Hello, " <> name <> "!"
  end
end"""
GREETER_IEX = '''iex> Greeter.hello("Ada")
"Hello, Ada!"'''
SHAPES = """defmodule Shapes do
  def area({:square, side}), do: side * side
  def area({:circle, r}), do: 3.14159 * r * r

  def describe(shape) do
    case area(shape) do
      a when a > 10 -> :large
      _ -> :small
    end
  end
end"""
SHAPES_IEX = """iex> Shapes.area({:square, 3})
9
iex> Shapes.describe({:circle, 2})
:large"""
PINGER = """defmodule Pinger do
  def start do
    spawn(fn ->
      receive do
        {:ping, from} -> send(from, Greeter.hello("pong"))
      end
    end)
  end
end"""


@dataclass
class Part:
    kind: str  # "h1", "h2", "prose", "bold", "code"
    text: str


CHAPTERS: list[list[Part]] = [
    [
        Part("h1", "Getting Started"),
        Part("prose", "Elixir code lives in modules. A module groups functions\nunder one name."),
        Part("bold", "module"),
        Part("h2", "Your First Module"),
        Part("prose", "Here is a module with one public function that builds a greeting."),
        Part("code", GREETER),
        Part("h2", "Interactive Elixir"),
        Part("prose", "Try it in the interactive shell, which prints each result."),
        Part("code", GREETER_IEX),
    ],
    [
        Part("h1", "Pattern Matching"),
        Part("prose", "Function heads can match on the shape of their arguments."),
        Part("code", SHAPES),
        Part("prose", "Calling the functions shows which clause matched."),
        Part("code", SHAPES_IEX),
    ],
    [
        Part("h1", "Processes"),
        Part(
            "prose",
            "As we saw in Chapter 1, Greeter.hello builds a greeting. Here a process\n"
            "sends one back when it receives a ping.",
        ),
        Part("code", PINGER),
    ],
]
CODE_BLOCKS = [GREETER, GREETER_IEX, SHAPES, SHAPES_IEX, PINGER]
FONTS = {"h1": ("hebo", 18), "h2": ("hebo", 14), "prose": ("tiro", 11), "bold": ("tibo", 11)}
CODE_FONT = ("cour", 9)
BOOK_TITLE = "Elixir by Example"


@dataclass
class Layout:
    """A small page, so that chapters run over several pages and code blocks cross page
    breaks, as in a real book: running heads (the book's title on left pages, the
    chapter's on right pages, none on a chapter's first page), page numbers at the foot,
    and left and right pages with different margins."""

    width: float = 440
    height: float = 216
    top: float = 56  # first baseline of the body
    bottom: float = 184  # no baseline below this
    head_y: float = 30
    foot_y: float = 204
    margins: tuple[float, float] = (64, 48)  # right (odd) pages, left (even) pages
    furniture: bool = True


@dataclass
class Typeset:
    pdf: bytes
    pages: int
    crossing: list[str]  # the texts of parts set across a page break


class Typesetter:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.document = pymupdf.open()
        self.page: pymupdf.Page | None = None
        self.y = 0.0

    @property
    def margin(self) -> float:
        return self.layout.margins[(self.document.page_count + 1) % 2]

    def new_page(self, chapter: str, opener: bool) -> None:
        layout = self.layout
        self.page = self.document.new_page(width=layout.width, height=layout.height)
        number = self.document.page_count
        if layout.furniture and not opener:
            head = BOOK_TITLE if number % 2 == 0 else chapter
            self.page.insert_text((self.margin, layout.head_y), head, fontname="helv", fontsize=8)
        if layout.furniture:
            self.page.insert_text(
                (layout.width / 2, layout.foot_y), str(number), fontname="helv", fontsize=9
            )
        self.y = layout.top

    def lines(self, lines: list[str], font: str, size: float, chapter: str) -> bool:
        """Set lines from the current position (one text block per page, code one line
        at a time at its indentation); whether they crossed a page break."""
        pitch = size * 1.25
        crossed = False
        pending: list[str] = []
        start = self.y

        def put() -> None:
            if pending and self.page is not None:
                self.page.insert_text(
                    (self.margin, start), "\n".join(pending), fontname=font, fontsize=size
                )
            pending.clear()

        for index, line in enumerate(lines):
            if self.y > self.layout.bottom:
                put()
                self.new_page(chapter, opener=False)
                crossed, start = index > 0, self.y
            if font == CODE_FONT[0]:
                indent = len(line) - len(line.lstrip(" "))
                if line.strip() and self.page is not None:
                    x = self.margin + indent * size * 0.6  # Courier: 0.6 em per character
                    self.page.insert_text((x, self.y), line.strip(), fontname=font, fontsize=size)
            else:
                pending.append(line)
            self.y += pitch
        put()
        return crossed


def typeset(chapters: list[list[Part]], layout: Layout, outline: bool = True) -> Typeset:
    """A book from parts, flowed over pages."""
    setter = Typesetter(layout)
    toc = []
    crossing = []
    for chapter in chapters:
        title = chapter[0].text
        setter.new_page(title, opener=True)
        for part in chapter:
            font, size = FONTS.get(part.kind, CODE_FONT)
            if part.kind in ("h1", "h2"):
                if setter.y > layout.bottom - 3 * size:  # no heading at the foot of a page
                    setter.new_page(title, opener=False)
                toc.append([1 if part.kind == "h1" else 2, part.text, setter.document.page_count])
            if setter.lines(part.text.split("\n"), font, size, title):
                crossing.append(part.text)
            setter.y += 10
    document = setter.document
    if outline:
        document.set_toc(toc)
    document.set_metadata({"title": BOOK_TITLE})
    return Typeset(document.tobytes(), document.page_count, crossing)


def make_pdf(outline: bool = True) -> bytes:
    """The sample book, typeset over small pages with running heads and page numbers."""
    return typeset(CHAPTERS, Layout(), outline).pdf


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return make_pdf()


def test_every_chapter_and_code_block_byte_exact(pdf: bytes) -> None:
    book = extract_book(pdf)
    assert book.title == "Elixir by Example"
    assert [c.title for c in book.chapters] == ["Getting Started", "Pattern Matching", "Processes"]
    found = [block.code for chapter in book.chapters for block in chapter.code_blocks]
    assert found == CODE_BLOCKS
    languages = [b.language for c in book.chapters for b in c.code_blocks]
    assert languages == ["elixir", "iex", "elixir", "iex", "elixir"]
    assert [s.title for s in book.chapters[0].sections] == [
        None,
        "Your First Module",
        "Interactive Elixir",
    ]


def test_concepts_and_the_cross_chapter_reference(pdf: bytes) -> None:
    book = extract_book(pdf)
    assert "Greeter" in book.introduces[1] and "hello" in book.introduces[1]
    assert "module" in book.introduces[1]  # set in bold
    assert "Shapes" in book.introduces[2] and "Pinger" in book.introduces[3]
    assert book.depends_on == {1: [], 2: [], 3: [1]}


def test_headings_by_font_size_when_there_is_no_outline() -> None:
    book = extract_book(make_pdf(outline=False))
    assert [c.title for c in book.chapters] == ["Getting Started", "Pattern Matching", "Processes"]
    assert [b.code for c in book.chapters for b in c.code_blocks] == CODE_BLOCKS


def package_of(pdf: bytes) -> RawPackage:
    sha256 = sha256_hex(pdf)
    return raw_package(
        f"book:{sha256}", name=BOOK_TITLE, license="CC0-1.0", sha256=sha256, size_bytes=len(pdf)
    )


def test_segments_pair_code_with_prose_and_carry_difficulty(pdf: bytes, tmp_path: Path) -> None:
    files = book_files(package_of(pdf), pdf)
    assert all(f.kind == "book_segment" and f.book is not None for f in files)
    segments = [f.book for f in files if f.book and f.book.code]
    assert [s.code for s in segments] == CODE_BLOCKS
    first = segments[0]
    assert first.prose.startswith("Here is a module") and first.section == "Your First Module"
    assert segments[3].prose == "Calling the functions shows which clause matched."
    pinger = segments[4]
    assert pinger.chapter == 3 and pinger.depends_on == [1]
    assert "Greeter" in pinger.references and "hello" in pinger.references
    assert pinger.difficulty == 3 and segments[2].difficulty == 2 and first.difficulty == 1
    assert all(f.content and "```" in f.content for f in files if f.book and f.book.code)
    assert len({f.sha256 for f in files}) == len(files)


def test_not_a_pdf() -> None:
    with pytest.raises(NotABook):
        extract_book(b"%PDF-1.7 but nothing else")


# ------------------------------------------------------------ page breaks and furniture

COUNTER = """defmodule Counter do
  @moduledoc "A counter process."
  use Agent

  def start_link(initial) do
    Agent.start_link(fn -> initial end, name: __MODULE__)
  end

  def value do
    Agent.get(__MODULE__, & &1)
  end

  def increment do
    Agent.update(__MODULE__, &(&1 + 1))
  end
end"""
COUNTER_IEX = """iex> Counter.start_link(41)
{:ok, #PID<0.120.0>}
iex> Counter.increment()
:ok
iex> Counter.value()
42"""
LONG_PROSE = (
    "An Agent keeps one value for the whole application. Every call goes through the\n"
    "process that owns it, so two callers never see half an update, and the state\n"
    "survives as long as the process does. We start it under a name so that the\n"
    "functions of the module can reach it without passing a pid around. Reading the\n"
    "value is a call that returns it; changing it is an update with a function of\n"
    "the old value, which the process applies in turn, one caller after another, so\n"
    "that no increment is lost however many processes ask at the same time. Agents\n"
    "are the simplest processes that hold state"
)
LONG_CHAPTERS: list[list[Part]] = [
    [
        Part("h1", "State in Processes"),
        Part("prose", LONG_PROSE),
        Part("code", COUNTER),
        Part("prose", "In the shell the counter starts at 41 and counts up."),
        Part("code", COUNTER_IEX),
    ],
    CHAPTERS[1],
]


def segments_text(files: list) -> str:
    return "\n".join(f.content for f in files)


def test_code_and_prose_across_page_breaks_without_running_heads_or_page_numbers() -> None:
    book = typeset(LONG_CHAPTERS, Layout())
    assert {COUNTER, COUNTER_IEX, SHAPES} <= set(book.crossing), "the layout must break them"
    assert LONG_PROSE in book.crossing and book.pages >= 6
    extracted = extract_book(book.pdf)
    assert extracted.warnings == []
    assert [c.title for c in extracted.chapters] == ["State in Processes", "Pattern Matching"]
    code = [b.code for c in extracted.chapters for b in c.code_blocks]
    assert code == [COUNTER, COUNTER_IEX, SHAPES, SHAPES_IEX]  # whole, byte-exact
    first = extracted.chapters[0].sections[0].items
    assert first[0] == " ".join(LONG_PROSE.split("\n"))  # one paragraph over the break
    files = book_files(package_of(book.pdf), book.pdf)
    text = segments_text(files)
    assert BOOK_TITLE not in text  # the left pages' running head
    for page in range(1, book.pages + 1):  # no page number left on a line of its own
        assert f"\n{page}\n" not in text.replace("\n9\n", "\n"), page  # `9`: an iex result


def test_an_outline_that_does_not_match_falls_back_to_font_sizes_and_warns() -> None:
    document = pymupdf.open(stream=make_pdf(), filetype="pdf")
    document.set_toc([[1, "Foreword", 1], [1, "Index", 2], [1, "Getting Started", 1]])
    book = extract_book(document.tobytes())
    assert [c.title for c in book.chapters] == ["Getting Started", "Pattern Matching", "Processes"]
    assert [b.code for c in book.chapters for b in c.code_blocks] == CODE_BLOCKS
    assert book.warnings == [
        "the outline does not match the text (1 of 3 entries found): headings taken from font sizes"
    ]


def test_outline_titles_match_headings_despite_numbering_case_and_spacing() -> None:
    document = pymupdf.open(stream=make_pdf(), filetype="pdf")
    toc = document.get_toc(simple=True)
    document.set_toc(
        [[level, f"{i + 1}.  {title.upper()}", page] for i, (level, title, page) in enumerate(toc)]
    )
    book = extract_book(document.tobytes())
    assert book.warnings == []
    assert len(book.chapters) == 3 and [b.code for c in book.chapters for b in c.code_blocks] == (
        CODE_BLOCKS
    )


def test_a_book_without_headings_is_one_chapter_with_a_warning() -> None:
    flat = [[Part("prose", "Elixir runs on the BEAM."), Part("code", GREETER)]]
    pdf = typeset(flat, Layout(), outline=False).pdf
    book = extract_book(pdf, "Flat")
    assert [c.title for c in book.chapters] == ["Flat"]
    assert book.warnings == ["no headings found: the whole text is one chapter"]
    files = book_files(package_of(pdf), pdf)
    assert [f.book.code for f in files if f.book] == [GREETER]


def test_headings_without_text_say_why_there_is_nothing() -> None:
    bare = [[Part("prose", "Copyright 2026 by the authors."), Part("h1", "Getting Started")]]
    with pytest.raises(NotABook, match="enclose no text"):
        extract_book(typeset(bare, Layout()).pdf)
