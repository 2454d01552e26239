"""The dead-letter queue: list what failed and why, and replay it to its topic."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from exforge.core.kafka import producer, read_all
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from schemas.records import DeadLetter


@dataclass(frozen=True)
class DeadLetterEntry:
    offset: str  # position in the dlq topic, "partition:offset"
    letter: DeadLetter


async def list_dead_letters(settings: Settings) -> list[DeadLetterEntry]:
    entries = []
    for record in await read_all(settings, "dlq"):
        try:
            letter = DeadLetter.model_validate_json(record.value or b"")
        except ValidationError:
            continue  # not ours: the DLQ topic is open to any producer
        entries.append(DeadLetterEntry(f"{record.partition}:{record.offset}", letter))
    return entries


def select_letters(
    entries: Iterable[DeadLetterEntry],
    ids: Iterable[str] = (),
    stage: str | None = None,
    error_class: str | None = None,
) -> list[DeadLetterEntry]:
    """Filter by DLQ position (`partition:offset`), stage and error class; one per
    original message, since a message can fail for several of its parts."""
    wanted = set(ids)
    chosen: dict[tuple[str, int, int], DeadLetterEntry] = {}
    for entry in entries:
        letter = entry.letter
        if wanted and entry.offset not in wanted:
            continue
        if stage and letter.stage != stage:
            continue
        if error_class and letter.error_class != error_class:
            continue
        chosen.setdefault((letter.topic, letter.partition, letter.offset), entry)
    return list(chosen.values())


async def replay(settings: Settings, store: ObjectStore, entries: Iterable[DeadLetterEntry]) -> int:
    """Send each original message back to its original topic with its original key."""
    count = 0
    async with producer(settings) as client:
        for entry in entries:
            letter = entry.letter
            value = store.get(letter.payload_ref)
            key = letter.key.encode() if letter.key is not None else None
            await client.send_and_wait(letter.topic, value, key=key)
            count += 1
    return count
