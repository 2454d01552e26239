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
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PLACEHOLDERS", "Redaction", "redact"]

PLACEHOLDERS: dict[str, str] = {"email": "<EMAIL>", "key": "<KEY>", "ip": "<IP_ADDRESS>"}

_KEY_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        # PEM private key blocks (also inside indented heredocs).
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        # AWS access key ids.
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",
        # GitHub tokens (classic and fine-grained).
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
        r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
        # Slack tokens and webhooks.
        r"\bxox[abposr]-[A-Za-z0-9-]{10,250}\b",
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+",
        # Stripe live keys, Google API keys.
        r"\b[rs]k_live_[0-9A-Za-z]{24,}\b",
        r"\bAIza[0-9A-Za-z_-]{35}\b",
    )
)
# A secret-like name, a separator (`:`, `=`, `=>`, `,` or a space after `@name`), then a
# quoted value; the value is replaced when it looks random (see `_looks_random`).
_BOUND_SECRET = re.compile(
    r"""(?ix)
    (?P<name>[A-Za-z_]*(?:secret|token|passw(?:or)?d|pwd|api_?key|access_?key|private_?key
        |auth_?key|credential|signing_?salt|encryption_?salt)[A-Za-z_0-9]*)
    (?P<sep>["']?\s*(?::|=>|=|,)?\s*)
    (?P<quote>["'])(?P<value>[^\s"'\#{}]{16,})(?P=quote)
    """
)
_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])"
)
_DOC_DOMAINS = ("example.com", "example.org", "example.net", "localhost")
_DOC_TLDS = (".example", ".test", ".invalid", ".localhost", ".local")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_VERSION_CONTEXT = re.compile(r"(?:~>|>=|<=|==|!=|>|<|\bv|version\W{0,4}|vsn\W{0,4})\s*$", re.I)
MIN_SECRET_ENTROPY = 3.5  # bits per character


@dataclass
class Redaction:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def redact(text: str) -> Redaction:
    """Replace secrets and PII in `text`; count each replacement by kind."""
    result = Redaction(text)
    for pattern in _KEY_PATTERNS:
        _sub(result, pattern, lambda _m: "key")
    _sub(result, _BOUND_SECRET, _bound_secret, group="value")
    _sub(result, _EMAIL, _email)
    _sub(result, _IPV4, _ip)
    if "::" in result.text or result.text.count(":") >= 7:
        _sub(result, _IPV6, _ip)
    return result


def _sub(
    result: Redaction,
    pattern: re.Pattern[str],
    kind_of: Callable[[re.Match[str]], str | None],
    group: str | int = 0,
) -> None:
    """Replace `group` of each match that `kind_of` names a kind for."""

    def replace(match: re.Match[str]) -> str:
        kind = kind_of(match)
        if kind is None:
            return match.group(0)
        result.counts[kind] += 1
        start, end = match.span(group)
        whole = match.group(0)
        offset = match.start(0)
        return whole[: start - offset] + PLACEHOLDERS[kind] + whole[end - offset :]

    result.text = pattern.sub(replace, result.text)


def _bound_secret(match: re.Match[str]) -> str | None:
    return "key" if _looks_random(match.group("value")) else None


def _looks_random(value: str) -> bool:
    if "://" in value or not any(c.isdigit() for c in value) or not any(c.isalpha() for c in value):
        return False
    counts = Counter(value)
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return entropy >= MIN_SECRET_ENTROPY


def _email(match: re.Match[str]) -> str | None:
    domain = match.group(0).rsplit("@", 1)[1].lower()
    if domain in _DOC_DOMAINS or domain.endswith(_DOC_TLDS):
        return None
    if any(domain.endswith("." + d) for d in _DOC_DOMAINS):
        return None
    return "email"


def _ip(match: re.Match[str]) -> str | None:
    candidate = match.group(0)
    try:
        address = ipaddress.ip_address(candidate.split("%", 1)[0])
    except ValueError:
        return None
    if not address.is_global:
        return None  # private, loopback, link-local, documentation ranges...
    if address.version == 4:
        before = match.string[max(0, match.start() - 16) : match.start()]
        if _VERSION_CONTEXT.search(before):
            return None
    return "ip"
