"""The `exforge` command line (Typer + rich). Every command that reads state takes --json."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Group

from exforge import __version__
from exforge.cli.backup import backup_app, replay_app
from exforge.cli.compress import bench_app, compress_app
from exforge.cli.console import (
    JsonFlag,
    console,
    database,
    emit_json,
    errors,
    fail,
    settings,
    table,
)
from exforge.cli.eval import eval_app
from exforge.cli.inspect import inspect_command
from exforge.cli.models import models_app
from exforge.cli.serve import generate, serve_app, usage
from exforge.core import tracing
from exforge.core.settings import Settings, describe_settings

app = typer.Typer(
    help="exforge: collect Elixir, turn it into training data, fine-tune, serve, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="Start, check and stop the embedded stack.", no_args_is_help=True)
topics_app = typer.Typer(help="The catalogue topics.", no_args_is_help=True)
ingest_app = typer.Typer(help="Ask the pipeline to collect sources.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: what failed, why, and replay.", no_args_is_help=True)
dataset_app = typer.Typer(help="The training data the pipeline produced.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(ingest_app, name="ingest")
app.add_typer(dlq_app, name="dlq")
app.add_typer(dataset_app, name="dataset")
train_app = typer.Typer(help="Fine-tune the base model with QLoRA (stages 1-3).")
app.add_typer(train_app, name="train")
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.add_typer(compress_app, name="compress")
app.add_typer(bench_app, name="bench")


def version_callback(value: bool) -> None:
    if value:
        console.print(f"exforge {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True)
    ] = False,
) -> None:
    """exforge: teach a code LLM Elixir. Settings come from EXFORGE_* variables and
    exforge.toml; `exforge settings` lists them."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # spans name the command's service: exforge-worker, exforge-ingest, exforge-serve, …
    tracing.setup(f"exforge-{ctx.invoked_subcommand or 'cli'}")


@app.command("settings")
def settings_command(as_json: JsonFlag = False) -> None:
    """List every setting with its current value and default."""
    current = settings().model_dump(mode="json")
    rows = [
        [var, current[var.removeprefix("EXFORGE_").lower()], default, doc]
        for var, default, doc in describe_settings()
    ]
    for row in rows:
        if "SECRET" in row[0] or "TOKEN" in row[0]:
            row[1] = "***" if row[1] else None
    if as_json:
        emit_json({row[0]: {"value": row[1], "default": row[2]} for row in rows})
    else:
        table("settings", ["variable", "value", "default", "meaning"], rows)


# ----------------------------------------------------------------------------- stack


def print_parts(parts: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json({part.name: part.as_dict() for part in parts})
        return
    table(
        "stack",
        ["part", "healthy", "embedded", "endpoint", "detail"],
        [[p.name, "yes" if p.healthy else "NO", p.embedded, p.endpoint, p.detail] for p in parts],
    )


@stack_app.command("up")
def stack_up(as_json: JsonFlag = False) -> None:
    """Start the embedded broker (unless EXFORGE_KAFKA_BOOTSTRAP is set), create the
    topics, prepare the store and the database."""
    from exforge.core import stack

    try:
        parts = stack.up(settings())
    except stack.StackError as exc:
        raise fail(str(exc)) from None
    print_parts(parts, as_json)
    if not all(part.healthy for part in parts):
        raise typer.Exit(1)


@stack_app.command("status")
def stack_status(as_json: JsonFlag = False) -> None:
    """Prove each part with a real request: Metadata, store put/get/delete, SELECT 1."""
    from exforge.core import stack

    parts = stack.status(settings())
    print_parts(parts, as_json)
    if not all(part.healthy for part in parts):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded broker (its in-memory topics go with it)."""
    from exforge.core import stack

    stopped = stack.down(settings())
    console.print("embedded broker stopped" if stopped else "no embedded broker was running")


# ---------------------------------------------------------------------------- topics


@topics_app.command("create")
def topics_create() -> None:
    """Create the catalogue topics that do not exist yet."""
    from exforge.core.kafka import create_topics

    created = asyncio.run(create_topics(settings()))
    console.print(
        f"created {len(created)} topic(s)" + (": " + ", ".join(created) if created else "")
    )


@topics_app.command("list")
def topics_list(as_json: JsonFlag = False) -> None:
    """The catalogue with each topic's partitions on the broker."""
    from exforge.core.kafka import list_topics
    from schemas.catalogue import CATALOGUE, topic_name

    config = settings()
    present = asyncio.run(list_topics(config))
    rows = []
    for spec in CATALOGUE:
        name = topic_name(config.topic_prefix, spec)
        rows.append(
            {
                "topic": name,
                "key": spec.key,
                "value": spec.value.__name__,
                "partitions": present.get(name),
                "internal": spec.internal,
            }
        )
    if as_json:
        emit_json(rows)
    else:
        table("topics", list(rows[0]), [list(r.values()) for r in rows])


# ---------------------------------------------------------------------------- ingest

INGEST_EXIT_CODES = (
    "Exit codes: 0 when every item listed was handled (requested, or skipped as "
    "unchanged or retired); 1 when some items failed (each is listed on stderr and "
    "counted in the summary; an unreachable broker fails them all); 2 for usage errors "
    "(bad arguments, a missing setting, a path that is not a Mix project or a PDF)."
)


def request_ingestion(config: Settings, request: Any) -> None:
    """Produce one `SourceRequest`; an unreachable broker fails the item (exit 1)."""
    from aiokafka.errors import KafkaError

    from exforge.core.kafka import produce

    try:
        asyncio.run(produce(config, "sources.requests", [(request.source_id, request)]))
    except (KafkaError, OSError) as exc:
        raise fail(f"{request.source_id}: not requested: {exc}", 1) from None


@ingest_app.command("dir", epilog=INGEST_EXIT_CODES)
def ingest_dir(
    path: Annotated[Path, typer.Argument(help="A Mix project directory.")],
    name: Annotated[str | None, typer.Option(help="Package name (default: from mix.exs).")] = None,
    version: Annotated[str | None, typer.Option(help="Version (default: from mix.exs).")] = None,
    license: Annotated[
        str | None, typer.Option(help="License (default: from mix.exs package licenses).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Pack a local Mix project into the store and request its ingestion."""
    from exforge.core.store import open_store
    from streams.sources.local import NotAProject, upload_directory

    config = settings()
    try:
        request = upload_directory(open_store(config), path, name, version, license)
    except NotAProject as exc:
        raise fail(str(exc), 2) from None
    request_ingestion(config, request)
    summary = {
        "source_id": request.source_id,
        "archive_key": request.archive_key,
        "sha256": request.sha256,
        "license": request.license,
    }
    if as_json:
        emit_json(summary)
    else:
        console.print(f"requested [bold]{request.source_id}[/] ({request.archive_key})")


def run_crawl(config: Settings, crawl: Any, as_json: bool) -> None:
    """Run a source crawl with a progress bar, print its summary, exit 1 on failures.
    `crawl(store, engine, sink, event)`: the source's crawl, its other arguments bound."""
    from aiokafka.errors import KafkaError

    from exforge.core.db import open_database
    from exforge.core.store import open_store
    from streams.sources.run import run_with_progress

    store, engine = open_store(config), open_database(config)
    try:
        summary = run_with_progress(
            config, lambda sink, event: crawl(store, engine, sink, event), errors
        )
    except (KafkaError, OSError) as exc:
        raise fail(f"the crawl stopped, nothing more was requested: {exc}", 1) from None
    print_crawl_summary(summary, as_json)
    if summary["failed"]:
        raise typer.Exit(1)


def print_crawl_summary(summary: dict[str, Any], as_json: bool) -> None:
    """The summary on stdout (a table, or JSON); each failed item on stderr."""
    if as_json:
        emit_json(summary)
    else:
        rows = [[k, v] for k, v in summary.items() if not isinstance(v, dict | list)]
        rows += [[f"  skipped: {k}", v] for k, v in summary["skipped_by_reason"].items()]
        rows += [[f"  failed: {k}", v] for k, v in summary["failed_by_reason"].items()]
        rows += [[f"http {k}", v] for k, v in summary.get("http", {}).items()]
        table("ingest summary", ["what", "count"], rows)
    for line in summary["errors"]:
        errors.print(f"[yellow]failed:[/] {line}", highlight=False)


@ingest_app.command("hex", epilog=INGEST_EXIT_CODES)
def ingest_hex(
    packages: Annotated[
        list[str] | None, typer.Argument(help="NAME or NAME@VERSION (default: latest).")
    ] = None,
    top: Annotated[int | None, typer.Option(help="The top N packages by --sort.")] = None,
    sort: Annotated[
        str, typer.Option(help="recent_downloads, total_downloads or updated_at.")
    ] = "recent_downloads",
    since: Annotated[
        str | None, typer.Option(help="Every package updated on or after DATE (YYYY-MM-DD).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Crawl Hex politely: list, skip what is unchanged, fetch and verify tarballs, and
    request their ingestion."""
    from datetime import date

    from streams.sources import hex as hexsrc

    config = settings()
    if sum(bool(x) for x in (packages, top, since)) != 1:
        raise fail("give package names, --top N or --since DATE (one of them)", 2)
    if sort not in hexsrc.SORTS:
        raise fail(f"--sort must be one of {', '.join(hexsrc.SORTS)}", 2)
    try:
        hexsrc.base_urls(config)
        selection = hexsrc.Selection(
            names=tuple(packages or ()),
            top=top,
            sort=sort,
            since=date.fromisoformat(since) if since else None,
        )
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    run_crawl(
        config,
        lambda store, engine, sink, event: hexsrc.crawl(
            config, store, engine, selection, sink, event
        ),
        as_json,
    )


@ingest_app.command("github", epilog=INGEST_EXIT_CODES)
def ingest_github(
    repos: Annotated[list[str] | None, typer.Argument(help="OWNER/REPO…")] = None,
    search: Annotated[
        str | None, typer.Option(help='A search query, e.g. "language:Elixir stars:>=50".')
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many search results.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Crawl GitHub: search (past the 1,000-result cap) or named repositories, record
    their history metrics, fetch head-commit archives, request their ingestion."""
    from streams.sources import github

    config = settings()
    if not repos and not search:
        raise fail("give OWNER/REPO names or --search QUERY", 2)
    try:
        github.api_url(config)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    run_crawl(
        config,
        lambda store, engine, sink, event: github.crawl(
            config, store, engine, list(repos or ()), search, limit, sink, event
        ),
        as_json,
    )


@ingest_app.command("book", epilog=INGEST_EXIT_CODES)
def ingest_book(
    path: Annotated[Path, typer.Argument(help="A PDF book.")],
    title: Annotated[str | None, typer.Option(help="Title (default: the file name).")] = None,
    license: Annotated[str | None, typer.Option(help="The book's license (SPDX).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Store a PDF book and request its ingestion (segments flow on as book_segment)."""
    from exforge.core.store import open_store
    from streams.sources.books import NotABook, extract_book
    from streams.sources.run import upload_book

    config = settings()
    if not path.is_file():
        raise fail(f"{path} is not a file", 2)
    try:
        book = extract_book(path.read_bytes(), title)
    except NotABook as exc:
        raise fail(f"{path}: {exc}", 2) from None
    request = upload_book(open_store(config), path, title, license)
    request_ingestion(config, request)
    summary = {
        "source_id": request.source_id,
        "archive_key": request.archive_key,
        "license": request.license,
        "title": book.title,
        "chapters": [
            {"number": c.number, "title": c.title, "code_blocks": len(c.code_blocks)}
            for c in book.chapters
        ],
        "depends_on": {str(k): v for k, v in book.depends_on.items()},
        "warnings": book.warnings,
    }
    if as_json:
        emit_json(summary)
    else:
        console.print(
            f"requested [bold]{request.source_id}[/]: {len(book.chapters)} chapters, "
            f"{sum(len(c.code_blocks) for c in book.chapters)} code blocks"
        )
        for warning in book.warnings:
            console.print(f"[yellow]warning:[/] {warning}")


# ---------------------------------------------------------------------------- worker


@app.command("worker")
def worker(
    stages: Annotated[
        str, typer.Option(help="Comma-separated stages to run: ingest,parse,instruct,shard.")
    ] = "ingest,parse,instruct,shard",
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit 0 once the pipeline is idle.")
    ] = False,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes on this machine (one per core); they share the "
            "partitions like workers on different machines.",
        ),
    ] = 1,
) -> None:
    """Run the Faust stage worker. Exit status: 0, 2 for bad options, else a worker's."""
    from streams.worker import run_workers

    config = settings()
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        code = run_workers(config, chosen, until_idle, processes)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    raise typer.Exit(code)


# ------------------------------------------------------------------------ lag and DLQ


@app.command("lag")
def lag(
    as_json: JsonFlag = False,
    window: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds between the two readings that give each stage's rate and ETA "
            "(0: one reading, no rates).",
        ),
    ] = 2.0,
) -> None:
    """Per stage: backlog, consumption rate and ETA of the worker group; per consumer
    group, topic and partition: committed offset, end offset and lag."""
    from exforge.core.kafka import consumer_lag, eta_text, stage_progress

    config = settings()
    before = asyncio.run(consumer_lag(config)) if window else []
    if window:
        time.sleep(window)
    rows = asyncio.run(consumer_lag(config))
    stages = stage_progress(config, rows, before, window)
    partitions = [
        {
            "group": r.group,
            "topic": r.topic,
            "partition": r.partition,
            "committed": r.committed,
            "end": r.end,
            "lag": r.lag,
        }
        for r in rows
    ]
    if as_json:
        emit_json(
            {
                "stages": [
                    {
                        "stage": p.stage,
                        "topic": p.topic,
                        "lag": p.lag,
                        "rate": p.rate,
                        "eta_s": p.eta_s,
                    }
                    for p in stages
                ],
                "partitions": partitions,
            }
        )
        return
    table(
        f"stages of {config.worker_group} (rate over {window:g} s)",
        ["stage", "topic", "lag", "messages/s", "ETA"],
        [
            [p.stage, p.topic, p.lag, "-" if p.rate is None else f"{p.rate:.1f}", eta_text(p.eta_s)]
            for p in stages
        ],
    )
    table(
        "consumer lag",
        ["group", "topic", "partition", "committed", "end", "lag"],
        [list(r.values()) for r in partitions],
    )


@dlq_app.command("list")
def dlq_list(as_json: JsonFlag = False) -> None:
    """Every dead letter: where it came from, which stage failed, and why."""
    from exforge.core.dlq import list_dead_letters

    entries = asyncio.run(list_dead_letters(settings()))
    if as_json:
        emit_json([{"id": e.offset, **e.letter.model_dump(mode="json")} for e in entries])
        return
    table(
        f"dead letters ({len(entries)})",
        ["id", "stage", "from", "key", "error", "message", "detail"],
        [
            [
                e.offset,
                e.letter.stage,
                e.letter.dead_letter_id,
                e.letter.key,
                e.letter.error_class,
                e.letter.error_message,
                ", ".join(f"{k}={v}" for k, v in e.letter.detail.items()),
            ]
            for e in entries
        ],
    )


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[
        list[str] | None, typer.Argument(help="DLQ ids (partition:offset) from `dlq list`.")
    ] = None,
    stage: Annotated[str | None, typer.Option(help="Only letters of this stage.")] = None,
    error_class: Annotated[str | None, typer.Option(help="Only this error class.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Send the original messages back to their topics (processing is idempotent)."""
    from exforge.core.dlq import list_dead_letters, replay, select_letters
    from exforge.core.store import open_store

    if not (ids or stage or error_class or all_):
        raise fail("say what to replay: ids, --stage, --error-class or --all", 2)
    config = settings()
    entries = asyncio.run(list_dead_letters(config))
    chosen = select_letters(entries, ids or (), stage, error_class)
    unknown = set(ids or ()) - {e.offset for e in entries}
    if unknown:
        raise fail(f"no dead letter with id {', '.join(sorted(unknown))}", 2)
    count = asyncio.run(replay(config, open_store(config), chosen))
    console.print(f"replayed {count} message(s)")


# --------------------------------------------------------------------------- dataset


@dataset_app.command("stats")
def dataset_stats(as_json: JsonFlag = False) -> None:
    """Packages, files kept and dropped (by reason), samples, shards."""
    from exforge.core.db import open_database
    from streams.dataset import stats

    data = stats(open_database(settings()))
    if as_json:
        emit_json(data)
        return
    files, samples, shards = data["files"], data["samples"], data["shards"]
    rows = [
        ["packages", data["packages"]],
        ["files seen", files["seen"]],
        ["files kept", files["kept"]],
        *[[f"  dropped: {reason}", n] for reason, n in files["dropped_by_reason"].items()],
        ["kept files with redactions", files["redacted"]],
        *[[f"  redacted: {kind}", n] for kind, n in files["redactions_by_kind"].items()],
        ["sources withheld (license)", data["licenses"]["withheld"]],
        *[[f"  withheld: {r}", n] for r, n in data["licenses"]["withheld_by_reason"].items()],
        ["samples", samples["total"]],
        *[[f"  kind: {kind}", n] for kind, n in samples["by_kind"].items()],
        *[[f"  stage: {stage}", n] for stage, n in samples["by_stage"].items()],
        *[[f"  difficulty: {d}", n] for d, n in samples["by_difficulty"].items()],
        *[[f"  license: {lic}", n] for lic, n in samples["by_license"].items()],
        *[[f"  source: {src}", n] for src, n in samples["by_source"].items()],
        *[[f"  split: {split}", n] for split, n in samples["by_split"].items()],
        ["sample tokens", data["tokens"]["samples"]],
        ["samples dropped", samples["dropped"]],
        *[[f"  dropped: {reason}", n] for reason, n in samples["dropped_by_reason"].items()],
        ["samples pending", samples["pending"]],
        ["shards", shards["total"]],
        ["samples in shards", shards["samples"]],
        ["tokens in shards", data["tokens"]["in_shards"]],
    ]
    table("dataset", ["what", "count"], rows)


@dataset_app.command("sample")
def dataset_sample(
    kind: Annotated[str, typer.Option("--kind", help="Sample kind, e.g. doc_to_code.")],
    n: Annotated[int, typer.Option("-n", help="How many samples.")] = 3,
    as_json: JsonFlag = False,
) -> None:
    """Show a few samples of one kind, pretty-printed."""
    from rich.markdown import Markdown
    from rich.panel import Panel

    from exforge.core.db import open_database
    from streams.dataset import pick

    config = settings()
    chosen = pick(open_database(config), config.dataset, kind, n)
    if as_json:
        emit_json(chosen)
        return
    if not chosen:
        raise fail(f"no samples of kind {kind!r}")
    for row in chosen:
        meta = row["meta"]
        title = (
            f"{meta['kind']} · stage {meta['stage']} · difficulty {meta.get('difficulty', 1)}"
            f" · {meta.get('license') or 'no license'} · {row['id'][:12]}"
        )
        turns = [Panel(Markdown(t["value"]), title=t["from"]) for t in row["conversations"]]
        console.print(Panel(Group(*turns), title=title))


@dataset_app.command("export")
def dataset_export(
    out: Annotated[Path, typer.Argument(help="Directory to write train/validation files to.")],
    fmt: Annotated[str, typer.Option("--format", help="sharegpt (JSONL) or parquet.")] = "sharegpt",
    as_json: JsonFlag = False,
) -> None:
    """Export the dataset in curriculum order for `datasets.load_dataset`, Axolotl…"""
    from exforge.core.db import open_database
    from streams.dataset import export

    if fmt not in ("sharegpt", "parquet"):
        raise fail(f"unknown format {fmt!r}: sharegpt or parquet", 2)
    config = settings()
    written = export(open_database(config), config.dataset, out, cast(Any, fmt))
    if as_json:
        emit_json({"out": str(out), "format": fmt, "files": written})
        return
    table(f"export → {out}", ["file", "samples"], [[k, v] for k, v in written.items()])


# ----------------------------------------------------------------------- train, models


def run_training(config_data: dict[str, Any], as_json: bool) -> None:
    from exforge.core.db import open_database
    from exforge.core.store import open_store
    from exforge.core.telemetry import serve_metrics
    from workers.trainer.display import training_progress
    from workers.trainer.recipe import Recipe, TrainConfig

    config = settings()
    recipe = Recipe(
        TrainConfig.model_validate(config_data), config, open_store(config), open_database(config)
    )
    if recipe.dist.main:
        serve_metrics(config.metrics_port)
    with training_progress(recipe, enabled=not as_json):
        summary = recipe.run()
    if as_json:
        emit_json(summary)
    else:
        console.print(
            f"run [bold]{summary['run_id']}[/] step {summary['step']}"
            f" validation {summary['final_validation']}"
        )


@train_app.callback(invoke_without_command=True)
def train(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Training config (.toml or .json).")
    ] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: new).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train through the configured stages; `exforge train resume RUN` continues a run."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.trainer.recipe import TrainConfig

    if config_file is None:
        raise fail("give --config FILE (or use `exforge train resume RUN`)", 2)
    data = TrainConfig.from_file(config_file).model_dump(mode="json")
    run_training(data | ({"run_id": run_id} if run_id else {}), as_json)


@train_app.command("resume")
def train_resume(
    run_id: Annotated[str, typer.Argument(help="The run to continue.")], as_json: JsonFlag = False
) -> None:
    """Continue a run from its latest checkpoint, with the configuration it saved."""
    from exforge.core.store import open_store
    from workers.trainer.checkpoint import saved_config

    data = saved_config(open_store(settings()), run_id)
    if data is None:
        raise fail(f"run {run_id} has no checkpoint", 2)
    run_training(data | {"run_id": run_id}, as_json)


@train_app.command("profile")
def train_profile(
    model: Annotated[str, typer.Option(help="Preset, model directory or HF id.")] = "tiny",
    quantisation: Annotated[str, typer.Option(help="nf4, int8 or none.")] = "nf4",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 2,
    every: Annotated[
        list[int] | None, typer.Option("--every", help="Also every k-th layer (repeatable).")
    ] = None,
    budget_gib: Annotated[float | None, typer.Option(help="Memory budget in GiB.")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per setting.")] = 3,
    as_json: JsonFlag = False,
) -> None:
    """Gradient checkpointing off / every layer / every k-th layer: time, memory, advice."""
    from exforge.llm.model import Quantisation
    from workers.trainer.profile import run_profile

    budget = int(budget_gib * 2**30) if budget_gib is not None else None
    cache = settings().root / "models"
    kind = cast(Quantisation, quantisation)
    report = run_profile(model, kind, seq_len, batch_size, every or [2], budget, cache, steps)
    if as_json:
        emit_json(report)
        return
    rows = [
        [r["setting"], r["layers"], f"{r['step_seconds']:.3f}", f"{r['peak_bytes'] / 2**20:.1f}"]
        for r in report["results"]
    ]
    table("gradient checkpointing", ["setting", "layers", "step s", "peak MiB"], rows)
    best = report["recommended"]
    console.print(f"recommended: {best['setting']}" if best else "nothing fits the budget")


# ---------------------------------------------------------------------------- doctor


@app.command("doctor")
def doctor(as_json: JsonFlag = False) -> None:
    """Dependency versions, GPU or CPU fallback, Elixir, and reachability of each service."""
    from exforge.cli.doctor import diagnose

    report = diagnose(settings())
    if as_json:
        emit_json(report)
    else:
        table(
            "versions",
            ["package", "version"],
            [[k, v or "not installed"] for k, v in report["versions"].items()],
        )
        accel = report["accelerator"]
        console.print(f"accelerator: {accel['device']} {accel.get('detail', '')}")
        table(
            "checks",
            ["check", "ok", "detail", "fix"],
            [
                [c["name"], "yes" if c["ok"] else "NO", c["detail"], c["fix"]]
                for c in report["checks"]
            ],
        )
    if not report["healthy"]:
        raise typer.Exit(1)


@app.command("demo")
def demo(as_json: JsonFlag = False) -> None:
    """The whole system on the sample corpus, on the embedded stack: pipeline, training
    of the tiny model, evaluation, and one completion streamed from Triton."""
    from exforge.cli.demo import run_demo
    from exforge.core.stack import StackError

    try:
        data = run_demo(settings(), lambda line: errors.print(f"[bold cyan]demo:[/] {line}"))
    except (StackError, RuntimeError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        emit_json(data)
    else:
        dataset_stats(as_json=False)
        training, evaluation = data["training"], data["evaluation"]
        table(
            f"training run {training['run_id']} → version {training['version']}",
            ["stage", "first loss", "last loss"],
            [
                [stage, f"{v['first']:.3f}", f"{v['last']:.3f}"]
                for stage, v in training["stages"].items()
            ],
        )
        console.print(
            f"evaluation: {evaluation['benchmark']}, {evaluation['problems']} problems, "
            f"pass@1 {evaluation['pass@1']:.3f}, statuses {evaluation['status_counts']}; "
            f"report {evaluation['html']}"
        )
        console.print(f"completion streamed from Triton: {data['completion']!r}")
    dataset = data["dataset"]
    if dataset["samples"]["total"] == 0 or dataset["shards"]["total"] == 0:
        raise fail("the demo produced no samples or no shards")


app.command("inspect")(inspect_command)
app.command("generate")(generate)
app.add_typer(serve_app, name="serve")
app.command("usage")(usage)
app.add_typer(backup_app, name="backup")


@app.command("alerts")
def alerts(as_json: JsonFlag = False) -> None:
    """Active anomalies: stage latency or throughput, consumer-lag growth or serving
    latency that departed from its own recent baseline (workers and gateways detect them)."""
    from exforge.core.anomaly import active

    rows = active(database())
    if as_json:
        emit_json(rows)
        return
    columns = ["signal", "subject", "since", "value", "baseline", "score", "unit", "origin"]
    table(f"{len(rows)} active anomalies", columns, [[r[c] for c in columns] for r in rows])


app.add_typer(replay_app, name="replay")


def main() -> None:
    app()
