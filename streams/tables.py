"""The stages' Faust tables, and the one memory budget of a worker's RocksDB tables.

Faust opens one RocksDB database per table and partition (4 tables x 16 partitions
here) and gives each its own block cache and write buffers, so the memory they may take
grows with the number of databases and, up to that large bound, with the data. A
`BudgetedTable` instead opens its RocksDB partitions with one block cache per process,
shared by every table and partition, with every memtable charged to it (a write buffer
manager over the same cache) and the index and filter blocks of the files on disk
cached in it too: a worker's RocksDB memory is `table_cache_mb`, whatever the number of
partitions and whatever the size of the tables on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import faust
import rocksdict
from faust.stores import rocksdb as faust_rocksdb
from faust.types import EventT, StoreT
from faust.types.tuples import Message
from yarl import URL

# a database's memtable: small, as 64 of them share the budget
WRITE_BUFFER_BYTES = 1024 * 1024
# share of the budget the memtables may take before they are flushed
MEMTABLE_SHARE = 0.5


@cache
def budget(total_bytes: int) -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    """This process's block cache of `total_bytes` and the write buffer manager that
    charges every memtable to it (one pair per process and size)."""
    shared = rocksdict.Cache(total_bytes)
    manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
        int(total_bytes * MEMTABLE_SHARE), False, shared
    )
    return shared, manager


class BudgetedOptions(faust_rocksdb.RocksDBOptions):
    """Faust's RocksDB options (rocksdict), with the process's shared memory budget."""

    def __init__(self, total_bytes: int, **options: Any) -> None:
        super().__init__(use_rocksdict=True, **options)
        self.total_bytes = total_bytes

    def as_options(self) -> rocksdict.Options:
        shared, manager = budget(self.total_bytes)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(WRITE_BUFFER_BYTES)
        options.set_max_write_buffer_number(2)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(manager)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(shared)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options

    def open(self, path: Path, *, read_only: bool = False) -> rocksdict.Rdict:
        db = rocksdict.Rdict(
            str(path), options=self.as_options(), access_type=rocksdict.AccessType.read_write()
        )
        db.set_read_options(rocksdict.ReadOptions())
        return db


# The first character of a changelog key that stands for several keys of the table
# (`BudgetedTable.write`): no key of these tables (sha256s, LSH bucket keys) begins so.
GROUP = "+"


def pack(values: Mapping[str, str | None]) -> str:
    """Several keys' values (None: deleted) as one changelog value: a JSON line of each
    key's length (None), then the values as they are. Not a JSON object: a value that is
    JSON itself (a held file, ~14 KB) would be escaped, a third larger."""
    lengths = {key: None if value is None else len(value) for key, value in values.items()}
    return json.dumps(lengths) + "\n" + "".join(v for v in values.values() if v is not None)


def unpack(packed: str) -> dict[str, str | None]:
    """The values `pack` packed."""
    header, _, rest = packed.partition("\n")
    values: dict[str, str | None] = {}
    start = 0
    for key, length in json.loads(header).items():
        if length is None:
            values[key] = None
        else:
            values[key] = rest[start : start + length]
            start += length
    return values


class BudgetedTable(faust.Table):
    """A Faust table whose RocksDB partitions share the process's memory budget
    (`options["budget_bytes"]`); in memory, a plain table. `write` changes several keys
    with one changelog message."""

    def write(self, group: str, values: Mapping[str, str | None]) -> None:
        """Set (a str) or delete (None) the keys of `values` in the current event's
        partition, with one changelog message for all of them, keyed `GROUP + group`:
        Faust sends one a key, each its own record on the broker and its own trip
        through the producer. `group` names what the write is, the same if it is done
        again (a redelivery): where the changelog is compacted, the last write of a
        group stands for it."""
        if not values:
            return
        for key, value in values.items():
            assert not key.startswith(GROUP), key
            if value is not None:
                self.data[key] = value
            elif key in self.data:
                del self.data[key]
        self.send_changelog(self.partition_for_key(group), GROUP + group, pack(values))

    def _serializer_from_type(self, typ: Any) -> Any:
        """Strings as they are, in RocksDB and on the changelog: Faust's JSON would quote
        and escape them."""
        return "raw" if typ is str else super()._serializer_from_type(typ)

    def apply_changelog_batch(self, batch: Iterable[EventT]) -> None:
        """Apply changelog records (recovery, standbys), a `write`'s as one of each of
        its keys."""
        super().apply_changelog_batch(self._ungrouped(batch))

    def _ungrouped(self, batch: Iterable[EventT]) -> Iterator[EventT]:
        serializers = self.app.serializers
        for event in batch:
            if not (isinstance(event.key, str) and event.key.startswith(GROUP)):
                yield event
                continue
            grouped = event.message
            for key, value in unpack(event.value).items():
                message = Message(
                    grouped.topic,
                    grouped.partition,
                    grouped.offset,
                    grouped.timestamp,
                    grouped.timestamp_type,
                    grouped.headers,
                    serializers.dumps_key(self.key_type, key, serializer=self.key_serializer),
                    None
                    if value is None
                    else serializers.dumps_value(
                        self.value_type, value, serializer=self.value_serializer
                    ),
                    None,
                    tp=grouped.tp,
                )
                yield faust.Event(self.app, key, value, None, message)

    def _new_store_by_url(self, url: str | URL) -> StoreT:
        total = self.options.get("budget_bytes") if self.options else None
        store = super()._new_store_by_url(url)
        if total is not None and isinstance(store, faust_rocksdb.Store):
            store.rocksdb_options = BudgetedOptions(total)
        return store


def table(
    app: faust.App, name: str, partitions: int, rocksdb_budget_mb: int | None
) -> BudgetedTable:
    """A str → str table, partitioned like the topics; `rocksdb_budget_mb` when the app
    stores tables in RocksDB."""
    options = None if rocksdb_budget_mb is None else {"budget_bytes": rocksdb_budget_mb << 20}
    created = BudgetedTable(
        app,
        name=name,
        default=str,
        beacon=app.tables.beacon,
        partitions=partitions,
        key_type=str,
        value_type=str,
        options=options,
    )
    app.tables.add(created)
    return created
