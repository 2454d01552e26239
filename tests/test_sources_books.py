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


def make_pdf(outline: bool = True) -> bytes:
    """A small book: one page per chapter, Times prose, Courier code."""
    document = pymupdf.open()
    toc = []
    for chapter in CHAPTERS:
        page = document.new_page()
        y = 72.0
        for part in chapter:
            font, size = FONTS.get(part.kind, ("cour", 9))
            if part.kind in ("h1", "h2"):
                toc.append([1 if part.kind == "h1" else 2, part.text, document.page_count])
            page.insert_text((72, y), part.text, fontname=font, fontsize=size)
            y += (part.text.count("\n") + 1) * size * 1.25 + 14
    if outline:
        document.set_toc(toc)
    document.set_metadata({"title": "Elixir by Example"})
    return document.tobytes()


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


def test_segments_pair_code_with_prose_and_carry_difficulty(pdf: bytes, tmp_path: Path) -> None:
    package = RawPackage(
        source_id=f"book:{sha256_hex(pdf)}",
        kind="book",
        name="Elixir by Example",
        version="1",
        license="CC0-1.0",
        archive_key="books/x.pdf",
        sha256=sha256_hex(pdf),
        size_bytes=len(pdf),
    )
    files = book_files(package, pdf)
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
