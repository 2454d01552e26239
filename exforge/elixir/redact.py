"""Secret and PII redaction: e-mail addresses, API keys and tokens, IP addresses.

`redact` is pure: it returns the redacted text and what it replaced, by kind. It runs on
a file's text before analysis, so no field of a `ParsedFile` (content, function sources,
docs) can carry what it removed.

In Elixir source a secret or an address can only be written in a literal or a comment,
so `redact_elixir` replaces only what lies inside the contents of strings, charlists,
heredocs, sigils and quoted atoms (not their interpolations) and inside comments (docs
are strings, heredocs or sigils): never in operators, binary size specifiers
(`<<a::4, b::4>>` is no IPv6 address) or identifiers, so the code around stays as it
was. A placeholder set inside a literal whose closing delimiter it holds (`~r<...>`)
has that character escaped. Prose (book text) goes through `redact` whole.

Found: e-mail addresses; PEM private-key blocks; AWS, GitHub, GitLab, Slack, Stripe
(secret and restricted, test and live), Google, OpenAI and Hugging Face keys; JSON Web
Tokens; credentials in URLs (`ecto://user:pass@host`: the `user:pass`); random-looking
values bound to secret-like names; public IP addresses. What stays: documentation
addresses (`example.com`, `.test`, `.invalid`, `localhost`), private, loopback and
documentation IP ranges, version numbers (`~> 1.2.3.4`), and secret-like names bound to
values that are short, low-entropy, without digits, or URLs.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain

from tree_sitter import Node

from exforge.elixir.tree import Finder

__all__ = ["PLACEHOLDERS", "ElixirLiterals", "Redaction", "redact", "redact_elixir"]

PLACEHOLDERS: dict[str, str] = {"email": "<EMAIL>", "key": "<KEY>", "ip": "<IP_ADDRESS>"}

# Each pattern starts with a literal, so the regex engine skips ahead to candidates
# instead of trying every position (a substring test before each scan measured slower);
# what comes before a match is checked in Python (`_boundary`, the Stripe prefix).
_KEY_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        # PEM private key blocks (also inside indented heredocs).
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        # AWS access key ids.
        r"A(?:KIA|SIA|GPA|IDA|ROA|NPA|NVA|IPA)[0-9A-Z]{16}(?![0-9A-Za-z])",
        # GitHub tokens (classic and fine-grained).
        r"gh[pousr]_[A-Za-z0-9]{36,255}(?!\w)",
        r"github_pat_[A-Za-z0-9_]{22,255}",
        # GitLab personal access tokens.
        r"glpat-[A-Za-z0-9_-]{20,}",
        # Slack tokens and webhooks.
        r"xox[abposr]-[A-Za-z0-9-]{10,250}",
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+",
        # Stripe secret and restricted keys, live and test (`s` or `r` before the `k`).
        r"k_(?:live|test)_[0-9A-Za-z]{16,}",
        # Google API keys.
        r"AIza[0-9A-Za-z_-]{35}(?![\w-])",
        # OpenAI keys (legacy, project, service-account, admin); Hugging Face tokens.
        r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}",
        r"hf_[A-Za-z0-9]{34,40}(?![A-Za-z0-9])",
        # JSON Web Tokens: a base64url header and payload (both `{"...`) and a signature.
        r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    )
)
_STRIPE = re.compile(r"k_(?:live|test)_")
_STRIPE_PREFIXES = "rs"
# A quoted value without blanks; it is a secret when a secret-like name is bound to it
# just before (`name: "v"`, `name = "v"`, `"name" => "v"`, `@name "v"`, `:name, "v"`) and
# it looks random (see `_looks_random`). One pattern per quote: a pattern that starts with
# a literal is found much faster than one that starts with a choice.
_QUOTED = tuple(re.compile(rf"""{q}([^\s"'#{{}}\\]{{16,}}){q}""") for q in "\"'")
_SECRET_NAME = re.compile(
    r"""(?ix)(?:secret|token|passw(?:or)?d|pwd|api_?key|access_?key|private_?key|auth_?key
        |credential|salt)\w*["']?\s*(?::|=>|=|,)?\s*$"""
)
# Credentials in a URL: `scheme://user:password@` (the `user:password` goes).
_URL_CREDENTIALS = re.compile(r"://([^\s:/?#@\"'<>]+:[^\s/?#@\"'<>]+)@")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*$")
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24})(?![\w-])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]+$")
_DOC_DOMAINS = ("example.com", "example.org", "example.net", "localhost")
_DOC_TLDS = (".example", ".test", ".invalid", ".localhost", ".local")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*(?:%\w+)?")
# What every match of each address pattern holds: `.` and a digit; `:`, at most four hex
# digits and `:`.
_IP_MARKERS = ((_IPV4, re.compile(r"\.\d")), (_IPV6, re.compile(r":[0-9A-Fa-f]{0,4}:")))
# What precedes a dotted number that is a version or a section, not an address.
_VERSION_CONTEXT = re.compile(
    r"(?:~>|>=|<=|==|!=|>|<|\bv|version\W{0,4}|vsn\W{0,4}|\u00a7|\bsection)\s*$", re.I
)
# Groups a written IPv6 address has at least (`2001:db8::1`): `1::1` or `a::4` is
# Elixir's binary size syntax, even inside a code sample in a string.
MIN_IPV6_GROUPS = 3
MIN_SECRET_ENTROPY = 3.5  # bits per character


Span = tuple[int, int, str]  # start, end, kind


@dataclass
class Redaction:
    text: str
    counts: Counter[str] = field(default_factory=Counter)
    # (kind, 1-based line in the redacted text) of each replacement
    lines: list[tuple[str, int]] = field(default_factory=list)


# Where a span of a text lies: None in code (no replacement there), else inside a
# literal or a comment, given as the closing delimiter of the literal ("" for none),
# whose characters a placeholder must escape.
Scope = Callable[[int, int], str | None]


def redact(text: str, scope: Scope | None = None) -> Redaction:
    """Replace secrets and PII in `text` (only where `scope` allows, when given); count
    each replacement by kind and note its line."""
    finders = (_keys, _url_credentials, _bound_secrets, _emails, _ips)
    spans = sorted(chain.from_iterable(find(text) for find in finders), key=lambda s: (s[0], -s[1]))
    result = Redaction(text)
    if not spans:
        return result
    parts: list[str] = []
    position = 0
    line = 1  # of `start` in the redacted text
    for start, end, kind in spans:
        if start < position:
            continue  # inside a span already replaced (an e-mail in a key block...)
        placeholder = PLACEHOLDERS[kind]
        if scope is not None:
            closing = scope(start, end)
            if closing is None:
                continue  # code, not a literal or a comment
            for char in set(closing) & set(placeholder):
                placeholder = placeholder.replace(char, "\\" + char)
        parts.append(text[position:start])
        parts.append(placeholder)
        line += text.count("\n", position, start)
        result.counts[kind] += 1
        result.lines.append((kind, line))
        position = end
    parts.append(text[position:])
    result.text = "".join(parts)
    return result


def redact_elixir(text: str, data: bytes, root: Node) -> Redaction:
    """`redact` inside the literals and comments of Elixir source (`data`: `text`
    encoded; `root`: its syntax tree)."""
    return redact(text, ElixirLiterals(text, data, root))


_LITERALS = frozenset({"string", "charlist", "sigil", "quoted_atom", "quoted_keyword"})


class ElixirLiterals:
    """A `Scope` for Elixir source: a span is in scope when it lies inside one comment,
    or inside the contents of one literal without touching its interpolations."""

    def __init__(self, text: str, data: bytes, root: Node) -> None:
        self.text = text
        self.data = data
        self.finder = Finder(root)  # spans come in source order
        self.ascii = len(text) == len(data)

    def offset(self, index: int) -> int:
        """The byte offset of a character offset."""
        return index if self.ascii else len(self.text[:index].encode("utf-8", "surrogatepass"))

    def __call__(self, start: int, end: int) -> str | None:
        first, last = self.offset(start), self.offset(end)
        node = self.finder.find(first, last)
        if node.type == "comment":
            return ""
        if node.type == "quoted_content":
            literal = self.finder.parent(node)
            if literal is None:
                return None
            node = literal
        if node.type not in _LITERALS:
            return None
        opening = node.child_by_field_name("quoted_start")
        closing = node.child_by_field_name("quoted_end")
        if opening is None or closing is None:
            return None
        if first < opening.end_byte or last > closing.start_byte:
            return None
        for child in node.named_children:
            if child.type == "interpolation" and child.start_byte < last and first < child.end_byte:
                return None
        return self.data[closing.start_byte : closing.end_byte].decode("utf-8", "replace")


def _boundary(text: str, start: int) -> bool:
    return start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_")


def _keys(text: str) -> Iterator[Span]:
    for pattern in _KEY_PATTERNS:
        for match in pattern.finditer(text):
            start = match.start()
            if _STRIPE.match(match.group(0)):
                if start == 0 or text[start - 1] not in _STRIPE_PREFIXES:
                    continue
                start -= 1
            if _boundary(text, start) or match.group(0).startswith("-----"):
                yield start, match.end(), "key"


def _url_credentials(text: str) -> Iterator[Span]:
    if "://" not in text:
        return
    for match in _URL_CREDENTIALS.finditer(text):
        if _SCHEME.search(text, max(0, match.start() - 32), match.start()):
            yield match.start(1), match.end(1), "key"


def _bound_secrets(text: str) -> Iterator[Span]:
    for pattern in _QUOTED:
        for match in pattern.finditer(text):
            before = text[max(0, match.start() - 64) : match.start()]
            if _SECRET_NAME.search(before) and _looks_random(match.group(1)):
                yield match.start(1), match.end(1), "key"


def _looks_random(value: str) -> bool:
    if "://" in value or not any(c.isdigit() for c in value) or not any(c.isalpha() for c in value):
        return False
    counts = Counter(value)
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return entropy >= MIN_SECRET_ENTROPY


def _emails(text: str) -> Iterator[Span]:
    for match in _EMAIL_DOMAIN.finditer(text):
        local = _EMAIL_LOCAL.search(text, max(0, match.start() - 64), match.start())
        if local is None or not local.group(0)[0].isalnum():
            continue
        domain = match.group(1).lower()
        if domain in _DOC_DOMAINS or domain.endswith(_DOC_TLDS):
            continue
        if any(domain.endswith("." + d) for d in _DOC_DOMAINS):
            continue
        yield local.start(), match.end(), "email"


def _ips(text: str) -> Iterator[Span]:
    for pattern, marker in _IP_MARKERS:
        for match in _line_matches(text, pattern, marker):
            start, end = match.span()
            if not _boundary(text, start) or _continues(text, end):
                continue
            if start and text[start - 1] in ".:":
                continue
            if _is_public_address(text, match):
                yield start, end, "ip"


def _continues(text: str, end: int) -> bool:
    """Whether an address-like match runs on into a longer token (a sentence's full stop
    ends it)."""
    if end >= len(text):
        return False
    after = text[end]
    if after == ".":
        return end + 1 < len(text) and not text[end + 1].isspace()
    return after.isalnum() or after in "_:"


def _line_matches(
    text: str, pattern: re.Pattern[str], marker: re.Pattern[str]
) -> Iterator[re.Match[str]]:
    """`pattern.finditer(text)` for a pattern whose matches never span lines and always
    hold a `marker` match: only the lines with a marker are scanned (the marker starts
    with a literal, which the regex engine finds fast; the pattern does not)."""
    position = 0
    while (hit := marker.search(text, position)) is not None:
        start = text.rfind("\n", 0, hit.start()) + 1
        end = text.find("\n", hit.end())
        end = len(text) if end == -1 else end
        yield from pattern.finditer(text, start, end)
        position = end


def _is_public_address(text: str, match: re.Match[str]) -> bool:
    candidate = match.group(0)
    try:
        address = ipaddress.ip_address(candidate.split("%", 1)[0])
    except ValueError:
        return False
    if not address.is_global:
        return False  # private, loopback, link-local, documentation ranges...
    if address.version == 6:
        return sum(1 for group in candidate.split(":") if group) >= MIN_IPV6_GROUPS
    before = text[max(0, match.start() - 16) : match.start()]
    return not _VERSION_CONTEXT.search(before)
