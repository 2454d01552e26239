"""Settings: defaults, `EXFORGE_*` variables, `exforge.toml`, and errors that name the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exforge.core.settings import Settings, SettingsError, describe_settings, load_settings
from exforge.core.stack import free_port
from schemas.catalogue import topic_name

EXFORGE = Path(sys.executable).parent / "exforge"


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No EXFORGE_* variable or exforge.toml from the developer's shell leaks into a test;
    returns the (absent) config file path EXFORGE_CONFIG points at."""
    for name in list(os.environ):
        if name.startswith("EXFORGE_"):
            monkeypatch.delenv(name)
    config = tmp_path / "exforge.toml"
    monkeypatch.setenv("EXFORGE_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    return config


def test_defaults() -> None:
    settings = load_settings()
    assert settings.data_dir == Path(".data")
    assert settings.kafka_bootstrap is None
    assert settings.bootstrap == "127.0.0.1:19092"
    assert settings.topic_prefix == "exforge."
    assert topic_name(settings.topic_prefix, "dlq") == "exforge.dlq"
    assert settings.worker_group == "exforge.worker"
    assert settings.topic_partitions == 4
    assert settings.shard_samples == 512
    assert settings.claim_check_bytes == 64 * 1024
    assert settings.s3_secure is True
    assert settings.dataset == "elixir"
    root = Path(".data").resolve()
    assert settings.resolved_store_url == (root / "store").as_uri()
    assert settings.resolved_database_url == f"sqlite:///{root / 'exforge.db'}"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXFORGE_SHARD_SAMPLES", "8")
    monkeypatch.setenv("EXFORGE_TOPIC_PREFIX", "t1.")
    monkeypatch.setenv("EXFORGE_S3_SECURE", "false")
    monkeypatch.setenv("EXFORGE_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("EXFORGE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("EXFORGE_DATABASE_URL", "postgresql+psycopg://u@db/x")
    settings = load_settings()
    assert settings.shard_samples == 8
    assert topic_name(settings.topic_prefix, "raw.packages") == "t1.raw.packages"
    assert settings.s3_secure is False
    assert settings.bootstrap == "kafka:9092"
    assert settings.resolved_store_url == (tmp_path / "d" / "store").as_uri()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/x"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.shard_samples = 3  # type: ignore[misc]


def test_toml_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, _isolated_settings: Path
) -> None:
    _isolated_settings.write_text(
        'shard_samples = 7\ndataset = "from_toml"\nembedded_kafka_port = 29092\n'
    )
    settings = load_settings()
    assert (settings.shard_samples, settings.dataset) == (7, "from_toml")
    assert settings.bootstrap == "127.0.0.1:29092"

    monkeypatch.setenv("EXFORGE_SHARD_SAMPLES", "9")
    settings = load_settings()
    assert settings.shard_samples == 9, "the environment wins over exforge.toml"
    assert settings.dataset == "from_toml", "what the environment leaves unset comes from TOML"


def test_exforge_toml_in_the_working_directory_is_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("EXFORGE_CONFIG")
    (tmp_path / "exforge.toml").write_text('topic_prefix = "cwd."\n')
    assert load_settings().topic_prefix == "cwd."


def test_explicit_overrides_win_over_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFORGE_DATASET", "env")
    assert load_settings(dataset="explicit").dataset == "explicit"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXFORGE_SHARD_SAMPLES", "abc"),
        ("EXFORGE_SHARD_SAMPLES", "0"),
        ("EXFORGE_TOPIC_PARTITIONS", "-1"),
        ("EXFORGE_EMBEDDED_KAFKA_PORT", "70000"),
        ("EXFORGE_IDLE_SECONDS", "0"),
        ("EXFORGE_S3_SECURE", "maybe"),
    ],
)
def test_invalid_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_invalid_toml_value_names_the_variable(_isolated_settings: Path) -> None:
    _isolated_settings.write_text("claim_check_bytes = -5\n")
    with pytest.raises(SettingsError, match="EXFORGE_CLAIM_CHECK_BYTES"):
        load_settings()


def test_every_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFORGE_SHARD_SAMPLES", "abc")
    monkeypatch.setenv("EXFORGE_METRICS_PORT", "-3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "EXFORGE_SHARD_SAMPLES" in str(caught.value)
    assert "EXFORGE_METRICS_PORT" in str(caught.value)


def test_describe_settings_lists_every_field() -> None:
    rows = describe_settings()
    assert [var for var, _, _ in rows] == [f"EXFORGE_{n.upper()}" for n in Settings.model_fields]
    assert all(doc for _, _, doc in rows), "every setting has a description"
    defaults = {var: default for var, default, _ in rows}
    assert defaults["EXFORGE_SHARD_SAMPLES"] == "512"
    assert defaults["EXFORGE_KAFKA_BOOTSTRAP"] == "unset"


# --- the CLI ---------------------------------------------------------------------------


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    assert EXFORGE.is_file(), f"the exforge script is not installed next to {sys.executable}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    environment.update(
        {
            "EXFORGE_CONFIG": str(cwd / "absent.toml"),
            "EXFORGE_DATA_DIR": str(cwd / "data"),
            # a narrow terminal: an error must still come out as one line
            "COLUMNS": "40",
        }
    )
    environment.update(env or {})
    return subprocess.run(
        [str(EXFORGE), *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_invalid_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli("settings", env={"EXFORGE_SHARD_SAMPLES": "abc"}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "EXFORGE_SHARD_SAMPLES" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_settings_json_lists_every_variable(tmp_path: Path) -> None:
    result = run_cli(
        "settings",
        "--json",
        env={"EXFORGE_SHARD_SAMPLES": "33", "EXFORGE_S3_SECRET_KEY": "hunter2"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {var for var, _, _ in describe_settings()}
    assert data["EXFORGE_SHARD_SAMPLES"] == {"value": 33, "default": "512"}
    assert data["EXFORGE_TOPIC_PREFIX"]["value"] == "exforge."
    assert data["EXFORGE_S3_SECRET_KEY"]["value"] == "***"
    assert "hunter2" not in result.stdout
    assert data["EXFORGE_GITHUB_TOKEN"]["value"] is None


def test_cli_ingest_dir_checks_the_path_before_the_broker(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "project"
    # nothing listens there: reaching for the broker would fail differently (or hang)
    result = run_cli(
        "ingest",
        "dir",
        str(missing),
        env={"EXFORGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"},
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


def test_cli_ingest_dir_rejects_a_directory_without_mix_exs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(
        "ingest",
        "dir",
        str(empty),
        env={"EXFORGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"},
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "mix.exs" in result.stderr
