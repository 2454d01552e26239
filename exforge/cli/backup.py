"""`exforge backup create|list|restore|prune|schedule` and `exforge replay raw`: disaster
recovery (the runbook is in the README)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from exforge.cli.console import JsonFlag, console, database, emit_json, fail, settings, table

backup_app = typer.Typer(
    help="Backups of the database and the store's manifest (in the store, backups/<id>/).",
    no_args_is_help=True,
)
replay_app = typer.Typer(help="Re-drive the pipeline from what the store holds.")

# restore: the database is back, but the store lacks or changed some manifest objects
EXIT_INCOMPLETE = 3


def _store():  # type: ignore[no-untyped-def]
    from exforge.core.store import open_store

    return open_store(settings())


@backup_app.command("create")
def backup_create(as_json: JsonFlag = False) -> None:
    """Snapshot the database (SQLite online backup / pg_dump), the API-key table and the
    checksums of every archive, shard, model and evaluation object. --json: {"id": ...}."""
    from exforge.core.backup import BackupError, create_backup

    try:
        manifest = create_backup(settings(), _store())
    except BackupError as exc:
        raise fail(str(exc)) from None
    if as_json:
        emit_json({"id": manifest["id"]})
    else:
        console.print(
            f"backup {manifest['id']}: {manifest['database']['dialect']} database "
            f"({manifest['database']['size']} bytes), {len(manifest['objects'])} objects"
        )


@backup_app.command("list")
def backup_list(as_json: JsonFlag = False) -> None:
    """Complete backups, oldest first."""
    from exforge.core.backup import list_backups

    rows = list_backups(_store())
    if as_json:
        emit_json(rows)
        return
    columns = ["id", "created_at", "dialect", "revision", "database_bytes", "objects", "api_keys"]
    table("backups", columns, [[row[c] for c in columns] for row in rows])


@backup_app.command("restore")
def backup_restore(
    backup_id: Annotated[str, typer.Argument(metavar="ID", help="A backup id (backup list).")],
    as_json: JsonFlag = False,
) -> None:
    """Load backup ID into the empty database of the settings, migrate it to this version's
    schema, and check every manifest object in the store. Exit 0: complete; 1: nothing
    restored (unknown id, database not empty, dump does not load); 3: database restored
    but objects are missing or changed (listed)."""
    from exforge.core.backup import BackupError, restore_backup

    try:
        report = restore_backup(settings(), _store(), backup_id)
    except BackupError as exc:
        raise fail(str(exc)) from None
    if as_json:
        emit_json(report.as_dict())
    else:
        verified = report.objects - len(report.missing) - len(report.changed)
        console.print(
            f"restored {report.id} ({report.dialect}, schema {report.revision_before} → "
            f"{report.revision_after}); {verified} of {report.objects} objects verified"
        )
        for key in report.missing:
            console.print(f"  missing: {key}")
        for key in report.changed:
            console.print(f"  changed: {key}")
    if not report.complete:
        raise typer.Exit(EXIT_INCOMPLETE)


@backup_app.command("prune")
def backup_prune(
    keep: Annotated[int | None, typer.Option(min=1, help="Default: EXFORGE_BACKUP_KEEP.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Delete all but the newest KEEP backups."""
    from exforge.core.backup import prune

    deleted = prune(_store(), keep or settings().backup_keep)
    if as_json:
        emit_json({"deleted": deleted})
    else:
        console.print(f"deleted {len(deleted)} backups")


@backup_app.command("schedule")
def backup_schedule(
    check_every_s: Annotated[float, typer.Option(min=0.1, help="How often to look.")] = 30.0,
) -> None:
    """Run until interrupted: back up whenever the newest backup is EXFORGE_BACKUP_INTERVAL_S
    old, keeping the newest EXFORGE_BACKUP_KEEP (the compose stack's `backup` service)."""
    from exforge.core.backup import BackupError, scheduled_tick

    config, store = settings(), _store()
    if config.backup_interval_s <= 0:
        raise fail("EXFORGE_BACKUP_INTERVAL_S is 0: scheduled backups are off", 2)
    try:
        while True:
            try:
                created = scheduled_tick(config, store, datetime.now(UTC))
            except BackupError as exc:  # the database may be back on the next look
                console.print(f"backup failed: {exc}")
            else:
                if created:
                    console.print(f"backup {created}")
            time.sleep(check_every_s)
    except KeyboardInterrupt:
        return


@replay_app.command("raw")
def replay_raw(as_json: JsonFlag = False) -> None:
    """Send every recorded package to raw.packages again, from the ledger and the stored
    archives (after the broker lost its data). Exit 1 when archives are missing."""
    from exforge.core.kafka import produce
    from streams.replay import raw_replay

    config = settings()
    replay = raw_replay(database(), _store())
    items = [(p.source_id, p) for p in replay.packages]
    sent = asyncio.run(produce(config, "raw.packages", items)) if items else 0
    if as_json:
        emit_json({"sent": sent, "missing": replay.missing, "changed": replay.changed})
    else:
        console.print(f"sent {sent} packages to raw.packages")
        for source_id in replay.missing:
            console.print(f"  archive missing: {source_id}")
        for source_id in replay.changed:
            console.print(f"  archive changed: {source_id}")
    if replay.missing or replay.changed:
        raise typer.Exit(1)
