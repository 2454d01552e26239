"""A safe reader for Erlang terms in text form, as Hex writes `metadata.config`.

The file is a sequence of `{Key, Value}.` terms. Only the subset Hex uses is accepted:
binaries (`<<"text">>`, `<<"text"/utf8>>`, `<<104,105>>`), strings, lists, tuples,
integers, floats and atoms (returned as strings; `true`/`false` as booleans). Nothing is
ever evaluated: this is a small recursive-descent parser with a depth limit, so a
hostile file can only fail to parse.
"""

from __future__ import annotations

import re
from typing import Any

from streams.stage import BadMessage

MAX_DEPTH = 64

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|%[^\n]*)
  | (?P<bin_open><<)
  | (?P<bin_close>>>)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<qatom>'(?:[^'\\]|\\.)*')
  | (?P<number>-?\d+(?:\.\d+(?:[eE][-+]?\d+)?)?)
  | (?P<atom>[a-z][A-Za-z0-9_@]*)
  | (?P<punct>[{}\[\],./|])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "e": "\x1b", "b": "\b", "f": "\f"}
_ESCAPES.update({"v": "\v", "d": "\x7f", "\\": "\\", '"': '"', "'": "'"})


class TermError(BadMessage):
    """The text is not in the accepted subset of Erlang terms."""


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[i + 1 :])
            assert digits is not None
            out.append(chr(int(digits.group(), 8)))
            i += 1 + len(digits.group())
        elif nxt == "x" and body[i + 2 : i + 3] == "{":
            end = body.index("}", i)
            out.append(chr(int(body[i + 3 : end], 16)))
            i = end + 1
        elif nxt == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise TermError(f"unexpected {text[position : position + 20]!r} at offset {position}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.index = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.index] if self.index < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "eof" or (value is not None and token[1] != value):
            raise TermError(f"expected {value or 'a term'} but found {token[1] or 'end of file'!r}")
        self.index += 1
        return token

    def sequence(self, close: str, depth: int) -> list[Any]:
        items: list[Any] = []
        if self.peek()[1] == close:
            self.take(close)
            return items
        while True:
            items.append(self.term(depth + 1))
            if self.peek()[1] == ",":
                self.take(",")
                continue
            self.take(close)
            return items

    def binary(self) -> str:
        if self.peek()[0] == "bin_close":
            self.take()
            return ""
        parts: list[str] = []
        byte_values: list[int] = []
        while True:
            kind, value = self.take()
            if kind == "string":
                text = _unescape(value[1:-1])
                if self.peek()[1] == "/":
                    self.take("/")
                    encoding = self.take()[1]
                    if encoding != "utf8":
                        raise TermError(f"unsupported binary segment type {encoding!r}")
                parts.append(text)
            elif kind == "number" and "." not in value and 0 <= int(value) < 256:
                byte_values.append(int(value))
            else:
                raise TermError(f"unsupported binary segment {value!r}")
            if self.peek()[0] == "bin_close":
                self.take()
                break
            self.take(",")
        if byte_values and parts:
            raise TermError("binaries mixing strings and bytes are not supported")
        if byte_values:
            try:
                return bytes(byte_values).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TermError(f"binary is not UTF-8 at byte {exc.start}") from None
        return "".join(parts)

    def term(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise TermError(f"terms nested deeper than {MAX_DEPTH}")
        kind, value = self.take()
        if kind == "bin_open":
            return self.binary()
        if kind == "string":
            return _unescape(value[1:-1])
        if kind == "qatom":
            return _unescape(value[1:-1])
        if kind == "number":
            return float(value) if "." in value else int(value)
        if kind == "atom":
            return {"true": True, "false": False}.get(value, value)
        if value == "[":
            return self.sequence("]", depth)
        if value == "{":
            return tuple(self.sequence("}", depth))
        raise TermError(f"unexpected {value!r}")


def parse_terms(text: str) -> list[Any]:
    """Every `Term.` of a file, in order."""
    parser = _Parser(text)
    terms = []
    while parser.peek()[0] != "eof":
        terms.append(parser.term())
        parser.take(".")
    return terms


def parse_metadata(text: str) -> dict[str, Any]:
    """A Hex `metadata.config` as a dict; proplists (lists of 2-tuples) become dicts."""
    metadata: dict[str, Any] = {}
    for term in parse_terms(text):
        if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], str)):
            raise TermError(f"metadata.config term {term!r:.80} is not a {{Key, Value}} pair")
        metadata[term[0]] = _plain(term[1])
    return metadata


def _plain(value: Any) -> Any:
    if isinstance(value, list) and value and all(_is_pair(x) for x in value):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list | tuple):
        return [_plain(x) for x in value]
    return value


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
