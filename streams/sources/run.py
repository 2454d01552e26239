"""Running a crawl from the command line: a producer as the sink, a progress bar on
stderr (so `--json` output stays clean), and book uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from exforge.core.kafka import producer
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from schemas.catalogue import topic_name
from schemas.records import SourceRequest
from streams.sources.crawl import Sink

Crawl = Callable[[Sink, Callable[[str], None]], Awaitable[dict[str, Any]]]


def run_with_progress(settings: Settings, crawl: Crawl, console: Console) -> dict[str, Any]:
    """Run `crawl` with every request produced to `sources.requests` as it is made."""
    counts = {"listed": 0, "fetched": 0, "skipped": 0, "failed": 0}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("fetched {task.fields[fetched]} · skipped {task.fields[skipped]}"),
        TextColumn("· failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )

    async def main() -> dict[str, Any]:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("packages", total=0, fetched=0, skipped=0, failed=0)

            def event(name: str) -> None:
                counts[name] += 1
                done = counts["fetched"] + counts["skipped"] + counts["failed"]
                progress.update(task, total=counts["listed"], completed=done, **counts)

            async with producer(settings) as client:
                topic = topic_name(settings.topic_prefix, "sources.requests")

                async def sink(request: SourceRequest) -> None:
                    await client.send_and_wait(
                        topic, request.to_bytes(), key=request.source_id.encode()
                    )

                return await crawl(sink, event)

    return asyncio.run(main())


def upload_book(
    store: ObjectStore, path: Path, title: str | None, license: str | None
) -> SourceRequest:
    """Store a PDF under `books/<sha256>.pdf`; the request the ingest stage verifies."""
    data = path.read_bytes()
    sha256 = sha256_hex(data)
    key = store.put_content_addressed("books", data, ".pdf")
    return SourceRequest(
        source_id=f"book:{sha256}",
        kind="book",
        name=title or path.stem,
        version=sha256[:12],
        license=license,
        archive_key=key,
        sha256=sha256,
        options={"title": title or path.stem, "file": path.name},
    )
