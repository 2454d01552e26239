"""The local Triton: the `tritonserver` binary of the nvidia-pytriton wheel, python backend.

Started like the embedded broker (exforge.core.stack): own process group, pid file, log in
the data dir. Models are loaded and unloaded explicitly through the repository API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from exforge.core.settings import PROJECT_ROOT, Settings
from exforge.core.stack import (
    StackError,
    log_dir,
    port_open,
    run_dir,
    running_pid,
    stop_pid,
    stop_recorded,
)
from serving.modelconfig import MAX_BATCH, cpu_config

START_TIMEOUT_S = 60.0
REPOSITORY_TOKEN = "exforge"  # the bundled build restricts the repository API to a token


@dataclass(frozen=True)
class Instance:
    """One tritonserver: its name (pid/log files) and loopback ports."""

    name: str
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"  # the address it binds; it is always asked on loopback

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def default_instance(settings: Settings) -> Instance:
    return Instance(
        "triton",
        settings.triton_http_port,
        settings.triton_grpc_port,
        settings.triton_metrics_port,
        settings.triton_host,
    )


def distribution() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def backends_dir(settings: Settings) -> Path:
    """A backend directory whose python backend has the stub for this Python version."""
    target = settings.root / "triton" / "backends"
    python = target / "python"
    stub = python / "triton_python_backend_stub"
    if stub.is_file():
        return target
    python.mkdir(parents=True, exist_ok=True)
    source = distribution()
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(source / "backends" / "python" / name, python / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(source / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return target


def server_env() -> dict[str, str]:
    """The stub links libpython: this interpreter's comes first (see DESIGN.md)."""
    import pytriton

    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    library_path = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    env = dict(os.environ)
    if env.get("LD_LIBRARY_PATH"):
        library_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    # The embedded interpreter finds its prefix through `python` on PATH: this one's, so
    # a virtual environment's site-packages (and its numpy) is what the stub imports.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["EXFORGE_TRITON_PYTHONPATH"] = str(PROJECT_ROOT)
    return env


def pid_file(settings: Settings, instance: Instance) -> Path:
    return run_dir(settings) / f"{instance.name}.pid"


def command(settings: Settings, instance: Instance, repository: Path) -> list[str]:
    return [
        str(distribution() / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backends_dir(settings)}",
        "--model-control-mode=explicit",
        f"--http-address={instance.host}",
        f"--grpc-address={instance.host}",
        f"--metrics-address={instance.host}",
        f"--http-port={instance.http_port}",
        f"--grpc-port={instance.grpc_port}",
        f"--metrics-port={instance.metrics_port}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=false",
        f"--http-restricted-api=model-repository:triton-access-token={REPOSITORY_TOKEN}",
        f"--grpc-restricted-protocol=model-repository:triton-access-token={REPOSITORY_TOKEN}",
        "--exit-timeout-secs=5",
    ]


def start(settings: Settings, instance: Instance, repository: Path) -> int:
    """Start tritonserver (no model loaded yet) and return its pid once it is live."""
    pid = running_pid(pid_file(settings, instance))
    if pid is not None:
        return pid
    for port in (instance.http_port, instance.grpc_port, instance.metrics_port):
        if port_open("127.0.0.1", port):
            raise StackError(f"port {port} is taken: set EXFORGE_TRITON_*_PORT")
    repository.mkdir(parents=True, exist_ok=True)
    log = (log_dir(settings) / f"{instance.name}.log").open("ab")
    process = subprocess.Popen(
        command(settings, instance, repository),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        start_new_session=True,
    )
    pid_file(settings, instance).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_file(settings, instance).unlink(missing_ok=True)
            raise StackError(f"tritonserver exited with {process.returncode}; see its log")
        if _get(f"{instance.http_url}/v2/health/live") == 200:
            return process.pid
        time.sleep(0.1)
    stop_pid(process.pid)
    raise StackError(f"tritonserver was not live within {START_TIMEOUT_S:.0f}s")


def wait(pid: int) -> int:
    """Wait for a tritonserver this process started; its exit code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def stop(settings: Settings, instance: Instance) -> bool:
    return stop_recorded(pid_file(settings, instance))


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _post(instance: Instance, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"{instance.http_url}{path}",
        data=json.dumps(body).encode(),
        headers={"triton-access-token": REPOSITORY_TOKEN, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise StackError(f"{path}: {exc.read().decode(errors='replace')}") from None
    return json.loads(raw) if raw else {}


def load(
    instance: Instance,
    name: str,
    versions: list[int],
    decode_batch: int = MAX_BATCH,
    decoupled: bool = True,
) -> None:
    """Load exactly `versions` of a cpu-flavor model (the policy is sent with the load),
    decoding up to `decode_batch` requests together, decoupled or not (`cpu_config`)."""
    config = json.dumps(cpu_config(name, versions, decode_batch, decoupled))
    _post(instance, f"/v2/repository/models/{name}/load", {"parameters": {"config": config}})


def unload(instance: Instance, name: str) -> None:
    _post(instance, f"/v2/repository/models/{name}/unload", {})


def index(instance: Instance) -> list[dict[str, object]]:
    """The repository index: every model folder with each version's state."""
    result = _post(instance, "/v2/repository/index", {})
    return result if isinstance(result, list) else []


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    live: bool
    pid: int | None
    grpc: str
    metrics: str
    models: list[dict[str, object]]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def status(settings: Settings, instance: Instance) -> InstanceStatus:
    live = _get(f"{instance.http_url}/v2/health/live") == 200
    return InstanceStatus(
        instance.name,
        live,
        running_pid(pid_file(settings, instance)),
        instance.grpc_url,
        f"http://127.0.0.1:{instance.metrics_port}/metrics",
        index(instance) if live else [],
    )
