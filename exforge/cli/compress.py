"""`exforge compress run|report` (smaller versions and what they cost) and
`exforge bench compare` (performance regressions between two benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from exforge.cli.console import JsonFlag, database, emit_json, fail, settings, table

compress_app = typer.Typer(
    help="Compressed model versions and their trade-offs.", no_args_is_help=True
)
bench_app = typer.Typer(help="Benchmark figures: regression detection.", no_args_is_help=True)


def model_version(text: str) -> tuple[str, int | None]:
    """`NAME:VERSION` or `NAME`."""
    name, _, version = text.partition(":")
    if not name or (version and not version.isdigit()):
        raise fail(f"--model takes NAME or NAME:VERSION, not {text!r}", 2)
    return name, int(version) if version else None


@compress_app.command("run")
def compress_run(
    model: Annotated[str, typer.Option(help="NAME:VERSION of the model to compress.")],
    methods: Annotated[
        str, typer.Option(help="Comma-separated, run in this order: prune, distill, share, fuse.")
    ] = "prune,distill,fuse",
    drop_layers: Annotated[
        int | None, typer.Option(help="Decoder layers to drop (default: a quarter, at least 1).")
    ] = None,
    mlp_keep: Annotated[float, typer.Option(help="Share of MLP channels kept.")] = 0.75,
    heal_steps: Annotated[int, typer.Option(help="QLoRA steps per stage after prune/share.")] = 8,
    distill_steps: Annotated[int, typer.Option(help="Distillation steps per stage.")] = 8,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term.")] = 0.5,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed training sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Packed sequences per training step.")] = 2,
    as_json: JsonFlag = False,
) -> None:
    """Register a smaller version per method, each with its lineage in the registry.

    Exit codes: 0 done, 1 a method failed (e.g. fused logits differ), 2 bad arguments or
    an unknown version."""
    from pydantic import ValidationError

    from exforge.cli.console import errors
    from exforge.core.store import open_store
    from exforge.llm.registry import get_version
    from workers.trainer.compress_options import CompressError, CompressOptions, parse_methods

    name, version = model_version(model)
    if version is None:
        raise fail("--model needs a version: NAME:VERSION", 2)
    try:
        chosen = parse_methods(methods)
        options = CompressOptions(
            drop_layers=drop_layers,
            mlp_keep=mlp_keep,
            heal_steps=heal_steps,
            distill_steps=distill_steps,
            temperature=temperature,
            alpha=alpha,
            seq_len=seq_len,
            batch_size=batch_size,
        )
    except CompressError as exc:
        raise fail(str(exc), 2) from None
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise fail(f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}", 2) from None
    config = settings()
    if get_version(database(), name, version) is None:
        raise fail(f"the registry has no {name}:{version}", 2)
    from workers.trainer.compress import Compressor  # torch: only once the arguments hold

    def say(line: str) -> None:
        errors.print(f"[bold cyan]compress:[/] {line}")

    compressor = Compressor(config, open_store(config), database(), options, say)
    try:
        made = compressor.run(name, version, chosen)
    except (CompressError, ValueError) as exc:  # ValueError: the recipe refused its data
        raise fail(str(exc)) from None
    if as_json:
        emit_json(made)
        return
    rows = [
        [r["version"], r["method"], r["parent_version"], json.dumps(r["parameters"])] for r in made
    ]
    table(f"{name}: versions registered", ["version", "method", "parent", "parameters"], rows)


@compress_app.command("report")
def compress_report(
    model: Annotated[str, typer.Option(help="NAME (every version) or NAME:VERSION (its lineage).")],
    out: Annotated[
        Path | None, typer.Option(help="Write report.json and compression.png here.")
    ] = None,
    prompts: Annotated[int, typer.Option(help="Prompts timed per version and round.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 32,
    rounds: Annotated[int, typer.Option(help="Timed rounds (the versions take turns).")] = 3,
    limit: Annotated[
        int | None, typer.Option(help="Evaluate only the first N problems (unevaluated versions).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Size, speed and pass@1 of every version of the lineage, with the Pareto front."""
    from exforge.core.store import open_store
    from workers.evaluator.compression import plot, report

    name, root = model_version(model)
    config = settings()
    try:
        rows = report(
            config, open_store(config), database(), name, root, prompts, max_tokens, rounds, limit
        )
    except LookupError as exc:
        raise fail(str(exc).strip("'\""), 2) from None
    data: dict[str, Any] = {"model": name, "rows": [row.as_dict() for row in rows]}
    if out is not None:
        data["plot"] = str(plot(rows, out / "compression.png"))
        (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        emit_json(data)
        return
    columns = ["version", "method", "size_bytes", "tokens_per_s", "pass_at_1", "idioms_pass_at_1"]
    cells = [[getattr(row, c) for c in columns] + ["*" if row.pareto else ""] for row in rows]
    table(f"{name}: compression report", [*columns, "pareto"], cells)


@bench_app.command("compare")
def bench_compare(
    baseline: Annotated[Path, typer.Argument(help="Figures JSON of the reference run.")],
    current: Annotated[Path, typer.Argument(help="Figures JSON of the run to judge.")],
    as_json: JsonFlag = False,
) -> None:
    """Flag every figure that moved by more than its measured noise band.

    Exit codes: 0 no regression, 1 a regression, 2 unreadable or unrelated files."""
    from pydantic import ValidationError

    from exforge.core.bench import compare, read_figures

    try:
        old, new = read_figures(baseline), read_figures(current)
    except (OSError, ValidationError, ValueError) as exc:
        raise fail(f"cannot read benchmark figures: {str(exc).splitlines()[0]}", 2) from None
    if old.benchmark != new.benchmark:
        raise fail(f"different benchmarks: {old.benchmark} and {new.benchmark}", 2)
    rows = compare(old, new)
    regressions = [row.name for row in rows if row.verdict == "regression"]
    if as_json:
        emit_json(
            {
                "benchmark": new.benchmark,
                "baseline_revision": old.git_revision,
                "current_revision": new.git_revision,
                "figures": [row.as_dict() for row in rows],
                "regressions": regressions,
            }
        )
    else:
        cells = [
            [
                r.name,
                f"{r.baseline:.4g}",
                f"{r.current:.4g}",
                "" if r.band is None else f"{r.band:.3g}",
                r.verdict,
            ]
            for r in rows
        ]
        table(
            f"{new.benchmark}: {old.git_revision[:12]} → {new.git_revision[:12]}",
            ["figure", "baseline", "current", "band", "verdict"],
            cells,
        )
    if regressions:
        raise typer.Exit(1)
