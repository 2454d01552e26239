"""Secret and PII redaction: e-mail addresses, API keys and tokens, IP addresses.

`redact` is pure: it returns the redacted text and what it replaced, by kind. It runs on
a file's text before analysis, so no field of a `ParsedFile` (content, function sources,
docs) can carry what it removed.

What stays: documentation addresses (`example.com`, `.test`, `.invalid`, `localhost`),
private, loopback and documentation IP ranges, version numbers (`~> 1.2.3.4`), and
secret-like names bound to values that are short, low-entropy, without digits, or URLs.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["PLACEHOLDERS", "Redaction", "redact"]

PLACEHOLDERS: dict[str, str] = {"email": "<EMAIL>", "key": "<KEY>", "ip": "<IP_ADDRESS>"}

# Each pattern starts with a literal (or a quote), so the regex engine skips ahead to
# candidates instead of trying every position; what comes before a match is checked in
# Python (`_boundary`, `_SECRET_NAME`).
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
        # Slack tokens and webhooks.
        r"xox[abposr]-[A-Za-z0-9-]{10,250}",
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+",
        # Stripe live keys, Google API keys.
        r"k_live_[0-9A-Za-z]{24,}",
        r"AIza[0-9A-Za-z_-]{35}(?![\w-])",
    )
)
_PREFIXED = frozenset({"k_live_"})  # needs `r` or `s` before it
# A quoted value without blanks; it is a secret when a secret-like name is bound to it
# just before (`name: "v"`, `name = "v"`, `"name" => "v"`, `@name "v"`, `:name, "v"`) and
# it looks random (see `_looks_random`). One pattern per quote: a pattern that starts with
# a literal is found much faster than one that starts with a choice.
_QUOTED = tuple(re.compile(rf"""{q}([^\s"'#{{}}\\]{{16,}}){q}""") for q in "\"'")
_SECRET_NAME = re.compile(
    r"""(?ix)(?:secret|token|passw(?:or)?d|pwd|api_?key|access_?key|private_?key|auth_?key
        |credential|salt)\w*["']?\s*(?::|=>|=|,)?\s*$"""
)
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24})(?![\w-])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]+$")
_DOC_DOMAINS = ("example.com", "example.org", "example.net", "localhost")
_DOC_TLDS = (".example", ".test", ".invalid", ".localhost", ".local")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*(?:%\w+)?")
# What every match of each address pattern holds: `.` and a digit; `:`, at most four hex
# digits and `:`.
_IP_MARKERS = ((_IPV4, re.compile(r"\.\d")), (_IPV6, re.compile(r":[0-9A-Fa-f]{0,4}:")))
_VERSION_CONTEXT = re.compile(r"(?:~>|>=|<=|==|!=|>|<|\bv|version\W{0,4}|vsn\W{0,4})\s*$", re.I)
MIN_SECRET_ENTROPY = 3.5  # bits per character


Span = tuple[int, int, str]  # start, end, kind


@dataclass
class Redaction:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def redact(text: str) -> Redaction:
    """Replace secrets and PII in `text`; count each replacement by kind."""
    spans = sorted(
        [*_keys(text), *_bound_secrets(text), *_emails(text), *_ips(text)],
        key=lambda span: (span[0], -span[1]),
    )
    result = Redaction(text)
    if not spans:
        return result
    parts: list[str] = []
    position = 0
    for start, end, kind in spans:
        if start < position:
            continue  # inside a span already replaced (an e-mail in a key block...)
        parts.append(text[position:start])
        parts.append(PLACEHOLDERS[kind])
        result.counts[kind] += 1
        position = end
    parts.append(text[position:])
    result.text = "".join(parts)
    return result


def _boundary(text: str, start: int) -> bool:
    return start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_")


def _keys(text: str) -> Iterator[Span]:
    for pattern in _KEY_PATTERNS:
        for match in pattern.finditer(text):
            start = match.start()
            if pattern.pattern.startswith(tuple(_PREFIXED)):
                if start == 0 or text[start - 1] not in "rs":
                    continue
                start -= 1
            if _boundary(text, start) or match.group(0).startswith("-----"):
                yield start, match.end(), "key"


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
            if not _boundary(text, start) or (
                end < len(text) and (text[end].isalnum() or text[end] in "_.:")
            ):
                continue
            if start and text[start - 1] in ".:":
                continue
            if _is_public_address(text, match):
                yield start, end, "ip"


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
    before = text[max(0, match.start() - 16) : match.start()]
    return address.version == 6 or not _VERSION_CONTEXT.search(before)
