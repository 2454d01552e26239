"""Build `elixir-primer.pdf`, the demo's book, from the text below (PyMuPDF).

    .venv/bin/python examples/books/make_book.py

Prose is set in Times, code in Courier, headings in Helvetica bold, with an outline:
the layout the book source reads (chapters, sections, code versus prose, `iex>`
sessions, a chapter that refers back to an earlier one). Text written for exforge,
dedicated to the public domain (CC0-1.0).
"""

from __future__ import annotations

from pathlib import Path

import pymupdf

HERE = Path(__file__).resolve().parent
FONTS = {"h1": ("hebo", 18), "h2": ("hebo", 14), "prose": ("tiro", 11), "code": ("cour", 9)}

CHAPTERS: list[list[tuple[str, str]]] = [
    [
        ("h1", "Modules and Functions"),
        (
            "prose",
            "Every function in Elixir lives in a module. Public functions are\n"
            "defined with def, private helpers with defp.",
        ),
        ("h2", "A First Module"),
        (
            "code",
            "defmodule Temperature do\n  def to_fahrenheit(celsius) do\n"
            "    celsius * 9 / 5 + 32\n  end\n\n  def freezing?(celsius), do: celsius <= 0\nend",
        ),
        ("prose", "The shell evaluates each expression and prints its value."),
        (
            "code",
            "iex> Temperature.to_fahrenheit(100)\n212.0\niex> Temperature.freezing?(-3)\ntrue",
        ),
    ],
    [
        ("h1", "Pattern Matching"),
        (
            "prose",
            "A function can have several clauses; the first whose pattern\n"
            "matches the arguments runs. Guards add conditions to a clause.",
        ),
        (
            "code",
            "defmodule Sign do\n  def of(0), do: :zero\n  def of(n) when n > 0, do: :positive\n"
            "  def of(_n), do: :negative\nend",
        ),
        ("h2", "Matching Tuples"),
        ("prose", "Results are often tagged tuples; case picks the branch by shape."),
        (
            "code",
            "defmodule Reply do\n  def describe(result) do\n    case result do\n"
            '      {:ok, value} -> "got #{value}"\n      {:error, reason} -> "failed: #{reason}"\n'
            "    end\n  end\nend",
        ),
    ],
    [
        ("h1", "Pipes"),
        (
            "prose",
            "As Chapter 1 showed, modules hold functions. The pipe operator passes\n"
            "the result of one function as the first argument of the next.",
        ),
        (
            "code",
            "defmodule Words do\n  def shout(text) do\n    text\n    |> String.split()\n"
            '    |> Enum.map(&String.upcase/1)\n    |> Enum.join(" ")\n  end\nend',
        ),
        ("code", 'iex> Words.shout("hello pipes")\n"HELLO PIPES"'),
    ],
    [
        ("h1", "Processes"),
        (
            "prose",
            "Using the pattern matching of Chapter 2, a process receives tagged\n"
            "messages and answers each one.",
        ),
        (
            "code",
            "defmodule Counter do\n  def loop(count) do\n    receive do\n"
            "      {:increment, by} -> loop(count + by)\n"
            "      {:get, from} ->\n        send(from, {:count, count})\n        loop(count)\n"
            "    end\n  end\nend",
        ),
    ],
]


def build() -> bytes:
    document = pymupdf.open()
    toc = []
    for chapter in CHAPTERS:
        page = document.new_page()
        y = 72.0
        for kind, text in chapter:
            font, size = FONTS[kind]
            if kind in ("h1", "h2"):
                toc.append([1 if kind == "h1" else 2, text, document.page_count])
            page.insert_text((72, y), text, fontname=font, fontsize=size)
            y += (text.count("\n") + 1) * size * 1.25 + 14
    document.set_toc(toc)
    document.set_metadata({"title": "An Elixir Primer", "author": "exforge"})
    return document.tobytes(garbage=4, deflate=True)


if __name__ == "__main__":
    target = HERE / "elixir-primer.pdf"
    target.write_bytes(build())
    print(f"wrote {target}")
