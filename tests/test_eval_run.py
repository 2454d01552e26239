"""`exforge eval run` end to end: a registered tiny version generates, the real sandbox
scores, results land in the registry table and the store; the demo's short evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exforge.core.db import engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import ObjectStore, open_store
from exforge.llm.registry import stored_metric
from tests.support.eval import register_tiny_version
from workers.evaluator.generate import Sampling
from workers.evaluator.report import result_key
from workers.evaluator.run import EvalError, EvalRequest, evaluate_for_demo, run_evaluation

EXFORGE = str(Path(sys.executable).parent / "exforge")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, ObjectStore]:
    data = tmp_path_factory.mktemp("evalrun") / "data"
    settings = load_settings(data_dir=data, eval_workers=2)
    store = open_store(settings)
    register_tiny_version(settings, store, engine_for(settings.resolved_database_url), "e")
    return settings, store


def test_cli_run_stores_results_and_a_rerun_generates_nothing(
    registered: tuple[Settings, ObjectStore],
) -> None:
    settings, store = registered
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(settings.data_dir), EXFORGE_EVAL_WORKERS="2")
    args = ["eval", "run", "--model", "e:1", "--n", "2", "--k", "1,2,5", "--limit", "3"]
    args += ["--max-tokens", "8", "--temperature", "0", "--json"]
    done = subprocess.run(
        [EXFORGE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"] == {"name": "e", "version": 1}
    assert (result["problems"], result["samples"], result["k"], result["k_skipped"]) == (
        3,
        6,
        [1, 2],
        [5],
    )
    assert result["generation"]["generated"] == 6 and result["generation"]["cached"] == 0
    assert sum(result["status_counts"].values()) == 6
    assert result["pass_at_k"]["1"] == stored_metric(
        engine_for(settings.resolved_database_url), "e", 1, "builtin"
    )
    assert json.loads(store.get(result_key("e", "1", "builtin"))) == result

    again = run_evaluation(
        settings,
        store,
        engine_for(settings.resolved_database_url),
        EvalRequest("e", None, "builtin", 2, (1, 2), Sampling(0.0, 8), limit=3),
    )
    assert again["generation"]["generated"] == 0 and again["generation"]["cached"] == 6
    assert [p["statuses"] for p in again["per_problem"]] == [
        p["statuses"] for p in result["per_problem"]
    ]


def test_idioms_run_through_the_same_command(registered: tuple[Settings, ObjectStore]) -> None:
    settings, store = registered
    engine = engine_for(settings.resolved_database_url)
    request = EvalRequest("e", 1, "idioms", sampling=Sampling(0.0, 4), limit=5)
    result = run_evaluation(settings, store, engine, request)
    assert result["benchmark"] == "idioms" and result["problems"] == 5
    assert result["isolation"] == "none (exact match)" and result["compile_rate"] is None
    assert stored_metric(engine, "e", 1, "idioms") == result["pass_at_k"]["1"]


def test_unknown_version_and_benchmark_are_reported(
    registered: tuple[Settings, ObjectStore],
) -> None:
    settings, store = registered
    engine = engine_for(settings.resolved_database_url)
    with pytest.raises(EvalError, match=r"no e:9"):
        run_evaluation(settings, store, engine, EvalRequest("e", 9))
    with pytest.raises(EvalError, match=r"missing\.jsonl"):
        run_evaluation(settings, store, engine, EvalRequest("e", 1, "missing.jsonl"))


def test_demo_evaluation_stores_results_and_writes_the_report(
    registered: tuple[Settings, ObjectStore], tmp_path: Path
) -> None:
    settings, store = registered
    summary = evaluate_for_demo(settings, "e", 1, limit=4, report_dir=tmp_path / "report")
    assert summary["benchmark"] == "builtin" and summary["problems"] == 4
    assert 0.0 <= summary["pass@1"] <= 1.0 and sum(summary["status_counts"].values()) == 4
    assert Path(summary["html"]).read_text().count("<table>") >= 3
    assert Path(summary["png"]).stat().st_size > 10_000
    assert store.exists(result_key("e", "1", "builtin"))
