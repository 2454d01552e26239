"""Records the tests build by hand."""

from __future__ import annotations

from typing import Any

from schemas.records import RawPackage


def raw_package(source_id: str, **fields: Any) -> RawPackage:
    """A `RawPackage` for calling a stage's steps directly (no archive behind it): kind,
    name and version from `source_id` (`kind:name@version`), any field overridable."""
    kind, _, rest = source_id.partition(":")
    name, _, version = rest.rpartition("@")
    values: dict[str, Any] = {
        "kind": kind,
        "name": name or rest,
        "version": version or "1",
        "archive_key": "unused",
        "sha256": "0" * 64,
        "size_bytes": 0,
        **fields,
    }
    return RawPackage(source_id=source_id, **values)
