"""Local Mix projects: pack a directory into a deterministic tar, content-addressed."""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from exforge.core.store import ObjectStore, sha256_hex
from schemas.records import SourceRequest

# Build output, dependencies and tool state are not the project's own code.
EXCLUDED_DIRS = frozenset({"_build", "deps", ".git", ".elixir_ls", "node_modules", "cover"})


class NotAProject(ValueError):
    pass


@dataclass(frozen=True)
class MixProject:
    name: str
    version: str
    licenses: tuple[str, ...]


def read_mix_project(path: Path) -> MixProject:
    """Name, version and declared licenses from `mix.exs` (read, never evaluated)."""
    mix = path / "mix.exs"
    if not mix.is_file():
        raise NotAProject(f"{path} has no mix.exs")
    text = mix.read_text(errors="replace")
    app = re.search(r"\bapp:\s*:(\w+)", text)
    version = re.search(r"\bversion:\s*\"([^\"]+)\"", text) or re.search(
        r"@version\s+\"([^\"]+)\"", text
    )
    licenses = re.search(r"\blicenses:\s*\[([^\]]*)\]", text)
    return MixProject(
        name=app.group(1) if app else path.resolve().name,
        version=version.group(1) if version else "0.0.0",
        licenses=tuple(re.findall(r"\"([^\"]+)\"", licenses.group(1))) if licenses else (),
    )


def project_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in relative.parts):
            continue
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def pack_directory(root: Path) -> bytes:
    """A tar of the project's files; the same tree always gives the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in project_files(root):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload_directory(
    store: ObjectStore,
    root: Path,
    name: str | None = None,
    version: str | None = None,
    license: str | None = None,
) -> SourceRequest:
    """Pack and store a Mix project; the request the ingest stage will verify."""
    if not root.is_dir():
        raise NotAProject(f"{root} is not a directory")
    project = read_mix_project(root)
    name = name or project.name
    version = version or project.version
    data = pack_directory(root)
    key = store.put_content_addressed(f"raw/dir/{name}/{version}", data, ".tar")
    return SourceRequest(
        source_id=f"dir:{name}@{version}",
        kind="dir",
        name=name,
        version=version,
        license=license or (" OR ".join(project.licenses) or None),
        archive_key=key,
        sha256=sha256_hex(data),
        options={"path": str(root.resolve())},
    )
