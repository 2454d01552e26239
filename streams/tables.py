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

from functools import cache
from pathlib import Path
from typing import Any

import faust
import rocksdict
from faust.stores import rocksdb as faust_rocksdb
from faust.types import StoreT
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


class BudgetedTable(faust.Table):
    """A Faust table whose RocksDB partitions share the process's memory budget
    (`options["budget_bytes"]`); in memory, a plain table."""

    def _new_store_by_url(self, url: str | URL) -> StoreT:
        total = self.options.get("budget_bytes") if self.options else None
        store = super()._new_store_by_url(url)
        if total is not None and isinstance(store, faust_rocksdb.Store):
            store.rocksdb_options = BudgetedOptions(total)
        return store


def table(app: faust.App, name: str, partitions: int, rocksdb_budget_mb: int | None) -> Any:
    """A str → str table, partitioned like the topics; `rocksdb_budget_mb` when the app
    stores tables in RocksDB."""
    options = None if rocksdb_budget_mb is None else {"budget_bytes": rocksdb_budget_mb << 20}
    return app.tables.add(
        BudgetedTable(
            app,
            name=name,
            default=str,
            beacon=app.tables.beacon,
            partitions=partitions,
            key_type=str,
            value_type=str,
            options=options,
        )
    )
