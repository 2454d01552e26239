"""The parse stage on real code: the ten corpus libraries, judged by Elixir's parser.

Every `.ex`/`.exs` file goes through the stage's own per-file steps and is held against
`Code.string_to_quoted/2` (`support.elixir_ast`, one Elixir VM for all files). A file is
left out of a comparison only when it is listed below with its reason; every exclusion
is printed at the end of the test run, and a file that newly needs one fails the suite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Pipeline
from sqlalchemy import select
from sqlalchemy.orm import Session

from exforge.core.db import FileOutcome, open_database
from exforge.core.store import sha256_hex
from tests.support.corpus import EXCLUSION, Judgement, judge, unpack

# Files Elixir's parser refuses, so no comparison can hold them to it.
ELIXIR_REJECTS = {
    "credo/.template.check.ex": "a code-generator template (`defmodule <%= @check_name %>`)",
}
# Files whose analysis may differ from Elixir's AST, with the reason.
ANALYSIS_EXCEPTIONS: dict[str, str] = {}


@pytest.fixture(scope="module")
def judgements(tmp_path_factory: pytest.TempPathFactory) -> list[Judgement]:
    work = tmp_path_factory.mktemp("corpus")
    found = judge(unpack(work / "corpus"), work)
    assert len(found) >= 900, "the corpus holds about 950 Elixir files"
    return found


def parsed(judgements: list[Judgement]) -> list[Judgement]:
    return [j for j in judgements if j.elixir_error is None]


def test_elixir_rejects_only_the_listed_files(
    judgements: list[Judgement], record_property: Callable[[str, object], None]
) -> None:
    rejected = {j.where: j.elixir_error for j in judgements if j.elixir_error}
    for where, error in rejected.items():
        reason = ELIXIR_REJECTS.get(where)
        record_property(EXCLUSION, f"{where}: Elixir rejects it ({error}): {reason}")
    assert set(rejected) == set(ELIXIR_REJECTS)


def test_every_file_elixir_parses_passes_the_syntax_filter(judgements: list[Judgement]) -> None:
    false_drops = [j.where for j in parsed(judgements) if j.outcome == "syntax_error"]
    assert false_drops == []


def test_no_hand_written_file_is_dropped_as_generated(judgements: list[Judgement]) -> None:
    assert [j.where for j in judgements if j.outcome == "auto_generated"] == []


def test_the_analysis_agrees_with_elixir_on_every_file(
    judgements: list[Judgement], record_property: Callable[[str, object], None]
) -> None:
    """Modules (nested, `defprotocol`, `defimpl`) and the distinct `{module, kind, name,
    arity}` wherever Elixir defines them (describe/if/for/test bodies, not quote)."""
    disagreements = {j.where: j.analysis_disagreement for j in parsed(judgements)}
    for where, reason in ANALYSIS_EXCEPTIONS.items():
        record_property(EXCLUSION, f"{where}: analysis compared with an exception: {reason}")
    unexpected = {
        where: problem
        for where, problem in disagreements.items()
        if problem and where not in ANALYSIS_EXCEPTIONS
    }
    assert unexpected == {}
    assert len(disagreements) == len(judgements) - len(ELIXIR_REJECTS)


def test_redaction_changes_no_code(judgements: list[Judgement]) -> None:
    """Every redacted file still parses under Elixir and defines the same modules and
    functions as the original."""
    redacted = [j for j in parsed(judgements) if j.redacted is not None]
    assert [(j.where, j.redacted_error) for j in redacted if j.redacted_error] == []
    changed = [(j.where, j.redaction_changed_definitions) for j in redacted]
    assert [c for c in changed if c[1]] == []


def test_the_judge_sees_what_it_judges(tmp_path: Path) -> None:
    """The comparison can fail: a file whose definitions Elixir sees and a broken one."""
    from tests.support.elixir_ast import elixir_views

    good = tmp_path / "good.ex"
    good.write_text('defmodule A do\n  describe "x" do\n    defp helper(a), do: a\n  end\nend\n')
    broken = tmp_path / "broken.ex"
    broken.write_text("defmodule B do\n  def f(, do: 1\nend\n")
    views = elixir_views([good, broken])
    assert views[0].definitions == {("A", "defp", "helper", 1)}
    assert views[1].error is not None and "missing terminator" in views[1].error


@pytest.mark.slow
def test_inspect_gives_the_outcomes_the_stage_records(pipeline: Pipeline, tmp_path: Path) -> None:
    """`exforge inspect DIR --json --text` on a corpus library against the parse stage
    run through the broker on the same library (`ingest dir`, a worker until idle)."""
    (library,) = unpack(tmp_path / "corpus", ["jason"])
    inspected = {
        r["path"]: r for r in pipeline.json("inspect", str(library.root), "--text")["files"]
    }
    pipeline.cli("ingest", "dir", str(library.root), "--license", "Apache-2.0")
    pipeline.run_until_idle()
    with Session(open_database(pipeline.settings)) as session:
        recorded = list(session.scalars(select(FileOutcome)))
    assert len(recorded) == len(library.files) == len(inspected)
    for row in recorded:
        report = inspected[row.path]
        if row.kept or row.reason in ("exact_duplicate", "near_duplicate"):
            assert report["outcome"] == "kept", row.path
            assert sha256_hex(report["text"].encode()) == row.sha256, row.path
            kinds = Counter(r["kind"] for r in report["redactions"])
            assert kinds == Counter(row.redactions or {}), row.path
        else:
            assert report["outcome"] == row.reason, row.path
    assert {r.reason for r in recorded} >= {None, "too_short"}  # both kinds were compared
