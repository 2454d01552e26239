"""Quality checks and a quality score for one Elixir file.

Every check is a pure predicate; the parse stage names each with its drop reason in its
list of filters (`streams.files.FILTERS`). Thresholds come from settings; the defaults
are StarCoder's (max line length 1000, mean line length 100, alphanumeric fraction 0.25).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import PurePosixPath
from typing import Any

from exforge.elixir.redact import Scope
from schemas.records import CodeMetrics, Quality

__all__ = [
    "VENDORED_DIRS",
    "Thresholds",
    "has_blob",
    "is_generated",
    "is_vendored",
    "leading_comments",
    "quality",
]

# Directories whose files are dependencies or build output, not the package's own code.
VENDORED_DIRS: frozenset[str] = frozenset(
    {"deps", "_build", "node_modules", "vendor", ".elixir_ls", "cover"}
)
_VENDORED_PAIRS: frozenset[tuple[str, str]] = frozenset({("priv", "static")})
# Generated code says so in its header: the comment block the file opens with.
_GENERATED_MARKER = re.compile(
    r"(?i)auto[- ]?generated|generated (?:by|from|with|using)|code generated|do not edit"
    r"|this file (?:was|is) (?:auto[- ]?)?generated|@generated"
)
_LEADING_COMMENTS = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*")  # blank and comment lines
# Known generator output: protobuf-elixir's messages and gRPC services name the
# generator's version in their `use` call (in code, not in a doc that shows one); its
# files are named `*.pb.ex`.
_GENERATOR_USE = re.compile(
    r"^[ \t]*use (?:Protobuf|GRPC\.Service),[^\n]*\bprotoc_gen_elixir_version:", re.MULTILINE
)
_GENERATED_SUFFIXES = (".pb.ex",)


@dataclass(frozen=True)
class Thresholds:
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_fraction: float = 0.25
    min_loc: int = 5
    max_loc: int = 10_000
    max_blob_chars: int = 256
    max_depth: int = 500

    @classmethod
    def from_settings(cls, settings: Any) -> Thresholds:
        return cls(
            max_line_length=settings.quality_max_line_length,
            max_mean_line_length=settings.quality_max_mean_line_length,
            min_alphanumeric_fraction=settings.quality_min_alphanumeric_fraction,
            min_loc=settings.quality_min_loc,
            max_loc=settings.quality_max_loc,
            max_blob_chars=settings.quality_max_blob_chars,
            max_depth=settings.quality_max_depth,
        )


def is_vendored(path: str) -> bool:
    """Dependencies and build output (`deps/`, `_build/`, `priv/static/`…)."""
    parts = PurePosixPath(path).parts[:-1]
    return any(part in VENDORED_DIRS for part in parts) or any(
        pair in _VENDORED_PAIRS for pair in pairwise(parts)
    )


def leading_comments(text: str) -> str:
    """The comment block a file opens with (with the blank lines in it)."""
    match = _LEADING_COMMENTS.match(text)
    return match.group(0) if match else ""


def is_generated(path: str, text: str, literals: Scope | None = None) -> bool:
    """Generated code: a generator marker in the leading comment block, or known
    generator output (protobuf/gRPC; `literals` tells a `use` call in code from one in a
    doc). Never judged from docs, strings or option names (`autogenerate: true`,
    "Returns the generated id")."""
    if path.endswith(_GENERATED_SUFFIXES):
        return True
    if _GENERATED_MARKER.search(leading_comments(text)):
        return True
    if "protoc_gen_elixir_version" not in text:
        return False
    return any(
        literals is None or literals(m.start(), m.end()) is None
        for m in _GENERATOR_USE.finditer(text)
    )


def has_blob(text: str, metrics: CodeMetrics, thresholds: Thresholds) -> bool:
    """A base64 run of `max_blob_chars` characters or a hex run of half that (a sha256
    digest, 64 hex digits, stays). Runs are within a line: files without a line that
    long are not searched."""
    size = thresholds.max_blob_chars
    if metrics.max_line_length < _hex_run(size):
        return False
    return _blob_pattern(size).search(text) is not None


def _hex_run(size: int) -> int:
    return max(size // 2, 16)


@cache
def _blob_pattern(size: int) -> re.Pattern[str]:
    return re.compile(rf"[A-Za-z0-9+/]{{{size},}}={{0,2}}|(?i:[0-9a-f]{{{_hex_run(size)},}})")


# Source signals and the value at which each counts fully (log-scaled below it).
SIGNAL_SCALES: dict[str, float] = {"stars": 1000.0, "downloads": 1_000_000.0, "contributors": 50.0}
CODE_WEIGHT = 0.7  # the rest goes to source signals, when there are any


def quality(metrics: CodeMetrics, source_metadata: Mapping[str, Any]) -> Quality:
    """A score in [0, 1]: code metrics, blended with the package's source signals.

    Code part (mean of): documentation coverage; comments (full at a ratio of 0.1 to
    0.4); line length (full up to a mean of 60 characters, 0 at the filter threshold);
    alphanumeric fraction (full from 0.5); complexity per 10 lines of code (full up to
    2, 0 from 6). Source part: the mean of `log1p(value) / log1p(scale)` over the
    signals present in the package metadata (`stars`, `downloads`, `contributors`).
    """
    doc = metrics.doc_coverage if metrics.doc_coverage is not None else 0.5
    ratio = metrics.comment_ratio
    comments = 1.0 if 0.1 <= ratio <= 0.4 else (ratio / 0.1 if ratio < 0.1 else 0.5)
    length = _ramp_down(metrics.mean_line_length, 60.0, 100.0)
    alnum = min(metrics.alphanumeric_fraction / 0.5, 1.0)
    density = 10.0 * metrics.complexity / max(metrics.loc, 1)
    branching = _ramp_down(density, 2.0, 6.0)
    code = (doc + comments + length + alnum + branching) / 5
    signals = {
        name: float(source_metadata[name])
        for name in SIGNAL_SCALES
        if isinstance(source_metadata.get(name), int | float) and source_metadata[name] >= 0
    }
    if not signals:
        return Quality(score=round(code, 4))
    source = sum(
        min(math.log1p(v) / math.log1p(SIGNAL_SCALES[k]), 1.0) for k, v in signals.items()
    ) / len(signals)
    score = CODE_WEIGHT * code + (1 - CODE_WEIGHT) * source
    return Quality(score=round(score, 4), signals=signals)


def _ramp_down(value: float, full: float, zero: float) -> float:
    """1 up to `full`, 0 from `zero`, linear between."""
    if value <= full:
        return 1.0
    if value >= zero:
        return 0.0
    return (zero - value) / (zero - full)
