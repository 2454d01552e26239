"""Dependency vulnerability audit: pip-audit over every installed distribution, against an
OSV advisory snapshot served on loopback, or against an online service.

    python deploy/security/audit.py                    # the snapshot (what `make lint` runs)
    python deploy/security/audit.py --service osv      # OSV's online API (needs its network)
    python deploy/security/audit.py refresh all.zip    # new snapshot from OSV's PyPI export

pip-audit's own services need the network: OSV's API, or per-release JSON of the package
index. Where neither answers (the build machines here), `pip-audit` without `--strict`
reports every package as skipped and still says "No known vulnerabilities found". This
script therefore always runs it with `--strict` (a package it cannot audit fails the
audit) and by default serves the committed snapshot `osv-snapshot.json` through the OSV
query protocol on 127.0.0.1, so the audit gives the same answer on any machine. The
snapshot is refreshed from OSV's bulk PyPI export (`refresh`), which keeps the records of
the distributions installed here. Reviewed exceptions live in `audit-ignore.toml`.

Exit codes: 0 no known vulnerability; 1 vulnerabilities found or a package not audited;
2 bad arguments or snapshot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
SNAPSHOT = HERE / "osv-snapshot.json"
IGNORES = HERE / "audit-ignore.toml"
# exforge itself (installed editable from this checkout) is not a published package
OWN = frozenset({"exforge"})

Record = dict[str, Any]


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def in_range(events: list[dict[str, str]], version: Version) -> bool:
    """OSV ECOSYSTEM range semantics: walk the events in version order; `introduced`
    starts an affected stretch, `fixed` ends it before that version, `last_affected` after."""

    def order(event: dict[str, str]) -> Version:
        value = next(iter(event.values()))
        return Version("0") if value == "0" else (_version(value) or Version("0"))

    affected = False
    for event in sorted(events, key=order):
        kind, bound = next(iter(event)), order(event)
        if kind == "introduced" and version >= bound:
            affected = True
        elif (kind == "fixed" and version >= bound) or (
            kind == "last_affected" and version > bound
        ):
            affected = False
    return affected


def affects(record: Record, name: str, version: str) -> bool:
    """Whether an OSV record names this PyPI package at this version."""
    if record.get("withdrawn"):
        return False
    parsed = _version(version)
    for affected in record.get("affected", []):
        package = affected.get("package", {})
        if package.get("ecosystem") != "PyPI" or canonicalize_name(package.get("name", "")) != name:
            continue
        if version in affected.get("versions", []):
            return True
        ranges = [r for r in affected.get("ranges", []) if r.get("type") == "ECOSYSTEM"]
        if parsed is not None and any(in_range(r.get("events", []), parsed) for r in ranges):
            return True
    return False


def load_snapshot(path: Path) -> dict[str, Any]:
    try:
        snapshot = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"audit: cannot read the advisory snapshot {path}: {exc}") from None
    if not isinstance(snapshot.get("vulns"), list):
        raise SystemExit(f"audit: {path} has no 'vulns' list")
    return snapshot


class _OsvQueries(BaseHTTPRequestHandler):
    """The OSV API's `POST /v1/query` over the snapshot's records."""

    records: ClassVar[list[Record]] = []

    def do_POST(self) -> None:
        query = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        name = canonicalize_name(query["package"]["name"])
        vulns = [r for r in self.records if affects(r, name, query["version"])]
        body = json.dumps({"vulns": vulns} if vulns else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def canonical(record: Record) -> Record:
    """The record with canonical package names (pip-audit matches fixes by that name)."""
    affected = [
        {**a, "package": {**a["package"], "name": canonicalize_name(a["package"]["name"])}}
        for a in record.get("affected", [])
        if "package" in a
    ]
    return {**record, "affected": affected}


@contextmanager
def serving(records: list[Record]) -> Iterator[str]:
    """An OSV query endpoint on a free loopback port for `records`; yields its URL."""
    handler = type("Handler", (_OsvQueries,), {"records": [canonical(r) for r in records]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query"
    finally:
        server.shutdown()
        server.server_close()


def installed() -> dict[str, str]:
    """Every distribution of this environment (name → version), exforge itself left out."""
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return {name: version for name, version in sorted(found.items()) if name not in OWN}


def ignores(path: Path) -> list[str]:
    """Reviewed advisory ids that do not fail the audit (each has a reason in the file)."""
    if not path.exists():
        return []
    entries = tomllib.loads(path.read_text()).get("ignore", [])
    missing = [e for e in entries if not e.get("reason")]
    if missing:
        raise SystemExit(f"audit: {path}: every ignored advisory needs a reason: {missing}")
    return [e["id"] for e in entries]


def run_pip_audit(requirements: Path, service: str, osv_url: str | None, ignored: list[str]) -> int:
    command = [
        sys.executable, "-m", "pip_audit", "--strict", "--no-deps", "--disable-pip",
        "--progress-spinner", "off", "-r", str(requirements), "-s", service,
    ]  # fmt: skip
    if osv_url:
        command += ["--osv-url", osv_url]
    for advisory in ignored:
        command += ["--ignore-vuln", advisory]
    return subprocess.run(command, check=False).returncode


def audit(packages: dict[str, str], service: str, snapshot_path: Path, ignore_path: Path) -> int:
    ignored = ignores(ignore_path)
    with tempfile.TemporaryDirectory(prefix="exforge-audit-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{n}=={v}\n" for n, v in packages.items()))
        if service != "snapshot":
            print(f"audit: {len(packages)} distributions against the online {service} service")
            return run_pip_audit(requirements, service, None, ignored)
        snapshot = load_snapshot(snapshot_path)
        print(
            f"audit: {len(packages)} distributions against {len(snapshot['vulns'])} advisories "
            f"of the OSV snapshot {snapshot_path.name} (taken {snapshot.get('taken') or 'never'}"
            f"; {len(ignored)} reviewed exceptions)"
        )
        with serving(snapshot["vulns"]) as url:
            return run_pip_audit(requirements, "osv", url, ignored)


def refresh(export: Path, packages: Iterable[str], snapshot_path: Path) -> int:
    """Keep the records of OSV's PyPI export (`all.zip`) that name an installed package."""
    wanted = set(packages)
    records = []
    with zipfile.ZipFile(export) as archive:
        for member in archive.namelist():
            record = json.loads(archive.read(member))
            names = {
                canonicalize_name(a.get("package", {}).get("name", ""))
                for a in record.get("affected", [])
            }
            if names & wanted:
                records.append(record)
    records.sort(key=lambda r: r["id"])
    snapshot = {
        "taken": datetime.fromtimestamp(export.stat().st_mtime, UTC).date().isoformat(),
        "source": "OSV PyPI export (all.zip)",
        "vulns": records,
    }
    snapshot_path.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"audit: {len(records)} advisories for installed packages → {snapshot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", choices=["snapshot", "osv", "pypi"], default="snapshot")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    parser.add_argument("--ignore-file", type=Path, default=IGNORES)
    parser.add_argument("--requirement", type=Path, help="audit NAME==VERSION lines instead")
    parser.add_argument("command", nargs="?", choices=["check", "refresh"], default="check")
    parser.add_argument("export", nargs="?", type=Path, help="refresh: OSV's PyPI all.zip")
    args = parser.parse_args(argv)
    packages = installed()
    if args.requirement:
        lines = args.requirement.read_text().split()
        packages = dict(tuple(line.split("==", 1)) for line in lines)  # type: ignore[misc]
    if args.command == "refresh":
        if args.export is None or not args.export.exists():
            parser.error("refresh needs the path of OSV's PyPI export (all.zip)")
        return refresh(args.export, packages, args.snapshot)
    return audit(packages, args.service, args.snapshot, args.ignore_file)


if __name__ == "__main__":
    sys.exit(main())
