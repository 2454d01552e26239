"""The security checks of `make lint`: the dependency audit (pip-audit, strict, against an
OSV snapshot served on loopback) flags an affected version and passes a fixed one; reviewed
exceptions need a reason; the snapshot refresh keeps installed packages' records; bandit
passes against the reviewed baseline; the worker image carries a CycloneDX SBOM."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
AUDIT = REPO / "deploy" / "security" / "audit.py"
# `make install` keeps the SBOM tool out of the project's environment (the Makefile says why)
SBOM_TOOL = Path(sys.executable).parent.parent / "sbom-tool" / "bin" / "cyclonedx-py"
ADVISORY = "TEST-2024-0001"


def _audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("exforge_audit", AUDIT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


audit = _audit_module()


def record(events: list[dict[str, str]], versions: tuple[str, ...] = ()) -> dict[str, object]:
    """An OSV record for the real package jinja2 (made up here, with a test id)."""
    return {
        "id": ADVISORY,
        "schema_version": "1.6.0",
        "summary": "sandbox escape (test advisory)",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "Jinja2"},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
                "versions": list(versions),
            }
        ],
    }


@pytest.mark.parametrize(
    ("events", "affected", "clean"),
    [
        ([{"introduced": "0"}, {"fixed": "3.1.3"}], ["2.0", "3.1.2"], ["3.1.3", "3.1.6"]),
        ([{"introduced": "3.0"}, {"fixed": "3.1.3"}], ["3.0", "3.1.2"], ["2.11.3", "3.1.3"]),
        ([{"introduced": "3.0"}, {"last_affected": "3.1.2"}], ["3.1.2"], ["2.11", "3.1.3"]),
        ([{"fixed": "2.0"}, {"introduced": "1.0"}, {"introduced": "3.0"}], ["1.5", "3.2"], ["2.5"]),
    ],
)
def test_osv_ranges(events: list[dict[str, str]], affected: list[str], clean: list[str]) -> None:
    for version in affected:
        assert audit.in_range(events, Version(version)), version
        assert audit.affects(record(events), "jinja2", version)
    for version in clean:
        assert not audit.in_range(events, Version(version)), version
    assert not audit.affects(record(events), "markupsafe", affected[0]), "another package"


def test_explicit_versions_and_withdrawn_records() -> None:
    listed = record([], versions=("2.10.1",))
    assert audit.affects(listed, "jinja2", "2.10.1")
    assert not audit.affects(listed, "jinja2", "2.10.2")
    assert not audit.affects({**listed, "withdrawn": "2024-01-01T00:00:00Z"}, "jinja2", "2.10.1")


def run_audit(tmp_path: Path, version: str, ignore: str = "") -> subprocess.CompletedProcess[str]:
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(
        json.dumps(
            {"taken": "2024-02-01", "vulns": [record([{"introduced": "0"}, {"fixed": "3.1.3"}])]}
        )
    )
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"jinja2=={version}\nmarkupsafe==2.1.5\n")
    ignores = tmp_path / "ignore.toml"
    ignores.write_text(ignore)
    return subprocess.run(
        [sys.executable, str(AUDIT), "--snapshot", str(snapshot), "--ignore-file", str(ignores),
         "--requirement", str(requirements)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_audit_flags_an_affected_version_and_passes_a_fixed_one(tmp_path: Path) -> None:
    flagged = run_audit(tmp_path, "3.1.2")
    assert flagged.returncode == 1, flagged.stdout + flagged.stderr
    assert re.search(rf"jinja2\s+3\.1\.2\s+{ADVISORY}\s+3\.1\.3", flagged.stdout), flagged.stdout
    assert "2 distributions against 1 advisories" in flagged.stdout
    fixed = run_audit(tmp_path, "3.1.3")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "No known vulnerabilities found" in fixed.stdout + fixed.stderr


def test_reviewed_exceptions_pass_only_with_a_reason(tmp_path: Path) -> None:
    reviewed = f'[[ignore]]\nid = "{ADVISORY}"\nreason = "templates are ours, never users\'"\n'
    assert run_audit(tmp_path, "3.1.2", reviewed).returncode == 0
    unexplained = run_audit(tmp_path, "3.1.2", f'[[ignore]]\nid = "{ADVISORY}"\n')
    assert unexplained.returncode != 0
    assert "needs a reason" in unexplained.stderr


def test_refresh_keeps_the_records_of_installed_packages(tmp_path: Path) -> None:
    export = tmp_path / "all.zip"
    other = {**record([{"introduced": "0"}]), "id": "TEST-OTHER"}
    other["affected"][0]["package"]["name"] = "not-installed-here"  # type: ignore[index]
    with zipfile.ZipFile(export, "w") as archive:
        archive.writestr(f"{ADVISORY}.json", json.dumps(record([{"introduced": "0"}])))
        archive.writestr("TEST-OTHER.json", json.dumps(other))
    snapshot = tmp_path / "snapshot.json"
    assert audit.refresh(export, ["jinja2", "pytest"], snapshot) == 0
    kept = json.loads(snapshot.read_text())
    assert [r["id"] for r in kept["vulns"]] == [ADVISORY] and kept["taken"]


def test_installed_lists_this_environment_without_exforge() -> None:
    packages = audit.installed()
    assert "exforge" not in packages
    assert {"sqlalchemy", "pip-audit", "bandit"} <= set(packages)


def test_bandit_passes_against_the_reviewed_baseline() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "bandit"), "-q", "-c", "pyproject.toml", "-r",
         "exforge", "streams", "serving", "workers", "schemas", "deploy",
         "-b", "deploy/security/bandit-baseline.json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    reviewed = (REPO / "deploy" / "security" / "README.md").read_text()
    baseline = json.loads((REPO / "deploy" / "security" / "bandit-baseline.json").read_text())
    for finding in baseline["results"]:
        assert finding["test_id"] in reviewed, f"{finding['test_id']} is not reviewed"


def test_cyclonedx_describes_an_environment(tmp_path: Path) -> None:
    out = tmp_path / "sbom.json"
    subprocess.run(
        [str(SBOM_TOOL), "environment", "--of", "JSON",
         "--no-validate", "-o", str(out), sys.executable],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    sbom = json.loads(out.read_text())  # validated by the tool in the image and make sbom
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"].startswith("1.")
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"sqlalchemy", "faust-streaming", "pydantic"} <= names
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "cyclonedx-py environment" in dockerfile and "/opt/exforge/sbom.cdx.json" in dockerfile
