"""Performance regression detection: figures written with the git revision, and
`exforge bench compare` flagging what moved beyond its measured noise band."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from exforge.cli import app
from exforge.core.bench import compare, figure, git_revision, judge, read_figures, write_figures

# Repeated runs of one figure on a noisy machine: tokens/s of five runs each.
BASELINE = [100.0, 96.0, 104.0, 99.0, 101.0]
NOISE = [103.0, 97.0, 100.0, 95.0, 102.0]  # another run of the same code
SLOWER = [80.0, 78.0, 83.0, 79.0, 81.0]  # a planted 20 % slowdown


def test_a_planted_slowdown_is_flagged_and_noise_is_not() -> None:
    band, verdict = judge(figure(BASELINE), figure(NOISE))
    assert verdict == "within noise" and band == 8.0  # the wider of the two ranges
    assert judge(figure(BASELINE), figure(SLOWER))[1] == "regression"
    assert judge(figure(SLOWER), figure(BASELINE))[1] == "improvement"
    # Lower is better for memory: more bytes is the regression.
    assert judge(figure([10, 11], better="lower"), figure([20, 21], better="lower"))[1] == (
        "regression"
    )
    assert judge(figure([100.0]), figure([50.0]))[1] == "unjudged"  # one run: no band


def test_figures_carry_the_revision_and_compare_by_name(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_revision().removesuffix("+dirty") == head
    old = write_figures(
        tmp_path / "a.json", "decode", {"tok_s": figure(BASELINE), "gone": figure([1, 2])}
    )
    new = write_figures(
        tmp_path / "b.json", "decode", {"tok_s": figure(SLOWER), "new": figure([1, 2])}
    )
    assert read_figures(tmp_path / "a.json") == old and old.git_revision == git_revision()
    assert [(row.name, row.verdict) for row in compare(old, new)] == [("tok_s", "regression")]


def test_bench_compare_command_exit_codes(tmp_path: Path) -> None:
    write_figures(tmp_path / "base.json", "decode", {"tok_s": figure(BASELINE, "tok/s")})
    write_figures(tmp_path / "noise.json", "decode", {"tok_s": figure(NOISE, "tok/s")})
    write_figures(tmp_path / "slow.json", "decode", {"tok_s": figure(SLOWER, "tok/s")})
    write_figures(tmp_path / "other.json", "train", {"tok_s": figure(BASELINE)})
    runner = CliRunner()

    def compare_files(*names: str) -> tuple[int, str]:
        paths = [str(tmp_path / name) for name in names]
        result = runner.invoke(app, ["bench", "compare", *paths, "--json"])
        return result.exit_code, result.stdout

    code, out = compare_files("base.json", "noise.json")
    assert code == 0 and json.loads(out)["regressions"] == []
    code, out = compare_files("base.json", "slow.json")
    report = json.loads(out)
    assert code == 1 and report["regressions"] == ["tok_s"]
    assert report["figures"][0]["change"] == 80.0 - 100.0
    assert compare_files("base.json", "other.json")[0] == 2
    assert compare_files("base.json", "missing.json")[0] == 2
    (tmp_path / "broken.json").write_text("{")
    assert compare_files("base.json", "broken.json")[0] == 2
