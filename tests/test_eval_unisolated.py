"""Where the kernel refuses namespaces, `exforge eval score` and `exforge eval run` refuse to
run candidates unisolated, say why and how to run anyway; with `--allow-unisolated` they
run them and say so. The refusal is real: the commands run under `support/no_namespaces.py`, in a
user namespace whose namespace limits are 0, so the sandbox's own probe meets the kernel's
refusal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exforge.core.db import engine_for
from exforge.core.settings import load_settings
from exforge.core.store import open_store
from tests.support.eval import register_tiny_version
from workers.evaluator.benchmarks import BUILTIN, load_benchmark
from workers.evaluator.generate import CACHE_PREFIX

EXFORGE = str(Path(sys.executable).parent / "exforge")
REPO = Path(__file__).resolve().parent.parent
NO_NAMESPACES = [sys.executable, str(REPO / "tests" / "support" / "no_namespaces.py")]
KERNEL_REFUSAL = re.compile(r"bubblewrap could not set up the sandbox here \(.*(ENOSPC|No space)")


def unisolated_exforge(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(data), EXFORGE_EVAL_WORKERS="1")
    return subprocess.run(
        [*NO_NAMESPACES, EXFORGE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def assert_refused(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "refusing to run candidates unisolated" in done.stderr
    assert KERNEL_REFUSAL.search(done.stderr), done.stderr
    assert "--allow-unisolated runs them anyway" in done.stderr


def assert_ran_unisolated(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    assert "warning: candidates run unisolated" in done.stderr
    result = json.loads(done.stdout)
    assert KERNEL_REFUSAL.match(result["isolation"].removeprefix("none: ")), result["isolation"]
    return result


def test_score_refuses_unisolated_unless_allowed(tmp_path: Path) -> None:
    problems = load_benchmark(BUILTIN).problems[:2]
    completions = tmp_path / "completions.jsonl"
    completions.write_text(
        "".join(
            json.dumps({"name": p.name, "completion": getattr(p, kind)}) + "\n"
            for p in problems
            for kind in ("reference", "broken")
        )
    )
    args = ["eval", "score", "--completions", str(completions), "--json"]

    assert_refused(unisolated_exforge(tmp_path / "data", *args))

    result = assert_ran_unisolated(
        unisolated_exforge(tmp_path / "data", *args, "--allow-unisolated")
    )
    assert [p["statuses"] for p in result["per_problem"]] == [["passed", "failed"]] * 2


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("unisolated") / "data"
    settings = load_settings(data_dir=data)
    register_tiny_version(
        settings, open_store(settings), engine_for(settings.resolved_database_url), "e"
    )
    return data


def test_run_refuses_unisolated_before_generating_unless_allowed(registered: Path) -> None:
    store = open_store(load_settings(data_dir=registered))
    args = ["eval", "run", "--model", "e:1", "--limit", "1", "--max-tokens", "4"]
    args += ["--temperature", "0", "--json"]

    assert_refused(unisolated_exforge(registered, *args))
    assert list(store.list(CACHE_PREFIX)) == []  # nothing generated, no model loaded
    assert not (registered / "eval-models").exists()

    result = assert_ran_unisolated(unisolated_exforge(registered, *args, "--allow-unisolated"))
    assert result["samples"] == 1 and result["generation"]["generated"] == 1
    assert len(list(store.list(CACHE_PREFIX))) == 1
