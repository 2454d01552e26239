"""Quality filters and a quality score for one Elixir file.

Every filter is a pure function returning the drop reason (the label `exforge dataset
stats` counts) or None. Thresholds come from settings; the defaults are StarCoder's
(max line length 1000, mean line length 100, alphanumeric fraction 0.25).
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

from schemas.records import CodeMetrics, Quality

__all__ = [
    "VENDORED_DIRS",
    "Thresholds",
    "blob_reason",
    "generated_reason",
    "metrics_reason",
    "path_reason",
    "quality",
]

# Directories whose files are dependencies or build output, not the package's own code.
VENDORED_DIRS: frozenset[str] = frozenset(
    {"deps", "_build", "node_modules", "vendor", ".elixir_ls", "cover"}
)
_VENDORED_PAIRS: frozenset[tuple[str, str]] = frozenset({("priv", "static")})
# Markers of generated code, looked for in the head of the file (case-insensitive).
_GENERATED_HEAD = re.compile(
    r"(?i)(auto[- ]?generated|generated (by|from|with|using)|code generated|do not edit"
    r"|this file (was|is) generated|@generated)"
)
_GENERATED_HEAD_CHARS = 1500
# Each header marker holds one of these words and spans at most `_MARKER_REACH`
# characters either side of the word's start (`this file was generated using`). Their
# letters match case-insensitively only their own cases, so they show in the lowercased
# head wherever a marker is.
_MARKER_WORDS = ("generated", "do not ed")
_MARKER_REACH = 15
# protobuf-elixir / grpc output, wherever it is in the file.
_GENERATED_ANYWHERE = re.compile(
    r"protoc_gen_elixir_version|use Protobuf,|protoc-gen-elixir|use GRPC\.Service,"
)


@dataclass(frozen=True)
class Thresholds:
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_fraction: float = 0.25
    min_loc: int = 5
    max_loc: int = 10_000
    max_blob_chars: int = 256

    @classmethod
    def from_settings(cls, settings: Any) -> Thresholds:
        return cls(
            max_line_length=settings.quality_max_line_length,
            max_mean_line_length=settings.quality_max_mean_line_length,
            min_alphanumeric_fraction=settings.quality_min_alphanumeric_fraction,
            min_loc=settings.quality_min_loc,
            max_loc=settings.quality_max_loc,
            max_blob_chars=settings.quality_max_blob_chars,
        )


def path_reason(path: str) -> str | None:
    """`vendored` for dependencies and build output (`deps/`, `_build/`, `priv/static/`…)."""
    parts = PurePosixPath(path).parts[:-1]
    if any(part in VENDORED_DIRS for part in parts):
        return "vendored"
    if any(pair in _VENDORED_PAIRS for pair in pairwise(parts)):
        return "vendored"
    return None


def generated_reason(text: str) -> str | None:
    """`auto_generated` for files with a generator header or protobuf/gRPC output."""
    if _has_generated_header(text[:_GENERATED_HEAD_CHARS]):
        return "auto_generated"
    if ("Protobuf" in text or "protoc" in text or "GRPC" in text) and _GENERATED_ANYWHERE.search(
        text
    ):
        return "auto_generated"
    return None


def _has_generated_header(head: str) -> bool:
    """`_GENERATED_HEAD.search(head)`, run only around the marker words (the regex is slow:
    case-insensitive, it tries every position)."""
    lowered = head.lower()
    if len(lowered) != len(head):  # some character lowercased to several: offsets differ
        return _GENERATED_HEAD.search(head) is not None
    for word in _MARKER_WORDS:
        at = lowered.find(word)
        while at != -1:
            if _GENERATED_HEAD.search(head, max(0, at - _MARKER_REACH), at + _MARKER_REACH):
                return True
            at = lowered.find(word, at + 1)
    return False


def blob_reason(text: str, metrics: CodeMetrics, thresholds: Thresholds) -> str | None:
    """`encoded_data` for a base64 run of `max_blob_chars` characters or a hex run of
    half that (a sha256 digest, 64 hex digits, stays). Runs are within a line: files
    without a line that long are not searched."""
    size = thresholds.max_blob_chars
    if metrics.max_line_length < _hex_run(size):
        return None
    return "encoded_data" if _blob_pattern(size).search(text) else None


def _hex_run(size: int) -> int:
    return max(size // 2, 16)


@cache
def _blob_pattern(size: int) -> re.Pattern[str]:
    return re.compile(rf"[A-Za-z0-9+/]{{{size},}}={{0,2}}|(?i:[0-9a-f]{{{_hex_run(size)},}})")


def metrics_reason(metrics: CodeMetrics, thresholds: Thresholds) -> str | None:
    """StarCoder's line filters, then size."""
    if metrics.max_line_length > thresholds.max_line_length:
        return "max_line_length"
    if metrics.mean_line_length > thresholds.max_mean_line_length:
        return "mean_line_length"
    if metrics.alphanumeric_fraction < thresholds.min_alphanumeric_fraction:
        return "alphanumeric_fraction"
    if metrics.loc < thresholds.min_loc:
        return "too_short"
    if metrics.loc > thresholds.max_loc:
        return "too_long"
    return None


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
