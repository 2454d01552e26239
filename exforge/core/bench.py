"""Benchmark figures as JSON with the git revision, and regression detection between two
such files.

A figures file holds, per figure, every repeated run's value, its median, its unit and
whether higher is better. `compare` judges each figure present in both files: the noise
band is the spread actually measured (the larger of the two files' ranges of runs), so
a figure is flagged only when its median moved by more than its runs already vary; a
figure with fewer than two runs on either side has no band and is reported unjudged.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Better = Literal["higher", "lower"]
Verdict = Literal["regression", "improvement", "within noise", "unjudged"]


class Figure(BaseModel):
    runs: list[float] = Field(min_length=1)
    unit: str = ""
    better: Better = "higher"

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        return max(self.runs) - min(self.runs)


class Figures(BaseModel):
    benchmark: str
    git_revision: str
    created_at: str
    device: str = "cpu"
    figures: dict[str, Figure]
    details: dict[str, Any] = Field(default_factory=dict)


def git_revision(directory: Path | None = None) -> str:
    """The checkout's HEAD commit (with `+dirty` for uncommitted changes), or `unknown`."""
    cwd = directory or Path(__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        head = subprocess.run(
            [git, "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def figure(runs: Sequence[float], unit: str = "", better: Better = "higher") -> Figure:
    return Figure(runs=[float(r) for r in runs], unit=unit, better=better)


def write_figures(
    path: Path,
    benchmark: str,
    figures: Mapping[str, Figure],
    device: str = "cpu",
    details: Mapping[str, Any] | None = None,
) -> Figures:
    document = Figures(
        benchmark=benchmark,
        git_revision=git_revision(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        device=device,
        figures=dict(figures),
        details=dict(details or {}),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document.model_dump_json(indent=2) + "\n")
    return document


def read_figures(path: Path) -> Figures:
    return Figures.model_validate_json(path.read_text())


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline: float
    current: float
    band: float | None
    unit: str
    verdict: Verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "figure": self.name,
            "baseline": self.baseline,
            "current": self.current,
            "change": self.current - self.baseline,
            "band": self.band,
            "unit": self.unit,
            "verdict": self.verdict,
        }


def judge(baseline: Figure, current: Figure) -> tuple[float | None, Verdict]:
    """The noise band of a figure and whether its move leaves it."""
    if len(baseline.runs) < 2 or len(current.runs) < 2:
        return None, "unjudged"
    band = max(baseline.spread, current.spread)
    change = current.median - baseline.median
    if abs(change) <= band:
        return band, "within noise"
    worse = change < 0 if baseline.better == "higher" else change > 0
    return band, "regression" if worse else "improvement"


def compare(baseline: Figures, current: Figures) -> list[Comparison]:
    """Every figure both files hold, judged against its measured noise band."""
    rows = []
    for name in sorted(set(baseline.figures) & set(current.figures)):
        old, new = baseline.figures[name], current.figures[name]
        band, verdict = judge(old, new)
        rows.append(Comparison(name, old.median, new.median, band, old.unit, verdict))
    return rows
