"""Settings from `EXFORGE_*` environment variables and an optional `exforge.toml`.

Environment variables win over the TOML file, which wins over the defaults. A service
whose URL is unset is served by the embedded stack (see `exforge.core.stack`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "EXFORGE_"
CONFIG_FILE_ENV = "EXFORGE_CONFIG"

PositiveInt = Annotated[int, Field(gt=0)]
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Relative to PROJECT_ROOT (see Settings.resolved_decontamination_files).
DEFAULT_BENCHMARKS = tuple(
    Path("benchmarks/data/multipl-e") / name
    for name in ("humaneval-elixir-transform.jsonl", "mbpp-elixir-reworded.jsonl")
)
Port = Annotated[int, Field(ge=0, le=65535)]
# Scaled-dot-product attention kernels the decoding loop can insist on (auto: PyTorch picks).
Attention = Literal["auto", "flash", "efficient", "cudnn", "math"]


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the variable."""


class Settings(BaseSettings):
    """Every knob of exforge. Field `foo_bar` is read from `EXFORGE_FOO_BAR`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Field(Path(".data"), description="Pid files, logs, file store, SQLite.")
    kafka_bootstrap: str | None = Field(
        None, description="host:port of an external Kafka; unset: embedded Tansu broker."
    )
    embedded_kafka_port: Port = Field(19092, description="Port of the embedded broker.")
    topic_prefix: str = Field("exforge.", description="Prefix of every topic name.")
    topic_partitions: PositiveInt = Field(4, description="Partitions of each created topic.")
    store_url: str | None = Field(
        None, description="file:///path or s3://bucket; unset: file store in the data dir."
    )
    s3_endpoint: str | None = Field(None, description="host:port of the S3 endpoint.")
    s3_access_key: str | None = Field(None, description="S3 access key.")
    s3_secret_key: str | None = Field(None, description="S3 secret key.")
    s3_secure: bool = Field(True, description="Use TLS for the S3 endpoint.")
    s3_region: str | None = Field(None, description="S3 region, if the endpoint needs one.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset: SQLite file in the data dir."
    )
    triton_url: str | None = Field(
        None,
        description="Triton gRPC endpoint(s) of the gateway, comma-separated host:port; "
        "unset: the local Triton (`exforge serve up`).",
    )
    triton_host: str = Field(
        "127.0.0.1", description="Address the local Triton binds (0.0.0.0 in a container)."
    )
    triton_http_port: Port = Field(8000, description="Local Triton HTTP port.")
    triton_grpc_port: Port = Field(8001, description="Local Triton gRPC port.")
    triton_metrics_port: Port = Field(8002, description="Local Triton /metrics port.")
    triton_decoupled: bool = Field(
        True,
        description="The cpu model streams a response per token (decoupled: the gateway and "
        "gRPC streaming clients need it); false: one response per request, which Triton's "
        "HTTP `infer` accepts (upstream's `decoupled_mode`).",
    )
    gateway_host: str = Field("127.0.0.1", description="Address the serving gateway binds.")
    gateway_port: Port = Field(8080, description="Port of the serving gateway.")
    gateway_concurrency: PositiveInt = Field(
        16, description="Generations the gateway runs at once; more wait in its queue."
    )
    gateway_queue: int = Field(
        64, ge=0, description="Requests that may wait for a slot; beyond: 429 + Retry-After."
    )
    gateway_deadline_s: float = Field(
        120.0, gt=0, description="Per-request deadline (queueing + generation), seconds."
    )
    gateway_rate_per_s: float = Field(
        5.0, gt=0, description="Default token-bucket refill per API key (requests/s)."
    )
    gateway_burst: PositiveInt = Field(20, description="Default token-bucket size per API key.")
    gateway_key_ttl_s: float = Field(
        2.0, gt=0, description="How long the gateway trusts a looked-up API key (revocation delay)."
    )
    gateway_kv_block_tokens: PositiveInt = Field(
        32, description="Tokens per KV-cache block of the served models (cached-token counts)."
    )
    gateway_cache_entries: int = Field(
        1024, ge=0, description="Exact-match cache size (temperature 0 + seed); 0: off."
    )
    gateway_max_body_bytes: PositiveInt = Field(
        1_048_576, description="Largest request body the gateway reads; larger: 400."
    )
    gateway_max_json_depth: PositiveInt = Field(
        32, description="Deepest JSON nesting of a request body; deeper: 400."
    )
    gateway_max_messages: PositiveInt = Field(
        256, description="Most messages in one chat request; more: 400."
    )
    gateway_max_prompt_tokens: PositiveInt = Field(
        32_768, description="Most Tekken tokens in a rendered prompt; more: 400."
    )
    gateway_redact_output: bool = Field(
        True,
        description="Redact keys, tokens, e-mail and IP addresses in generated text (streams "
        "are then released at whitespace).",
    )
    decode_attention: Attention = Field(
        "auto",
        description="Attention kernel of the decoding loop: auto (PyTorch picks among those "
        "the device has), flash, efficient (memory-efficient), cudnn or math.",
    )
    decode_compile: bool = Field(
        False, description="Compile the decoding step's forward with torch.compile."
    )
    decode_static_cache: bool = Field(
        False, description="Keys and values in preallocated buffers written in place."
    )
    rollback_window_s: float = Field(
        60.0, gt=0, description="Window over which a canary's errors and latency are judged."
    )
    rollback_min_requests: PositiveInt = Field(
        10, description="Canary requests in the window before it can be rolled back."
    )
    rollback_error_rate: float = Field(
        0.2, gt=0, le=1, description="Canary error rate that triggers automatic rollback."
    )
    rollback_p95_s: float = Field(
        30.0, gt=0, description="Canary p95 latency (s) that triggers automatic rollback."
    )
    hex_api_url: str | None = Field(None, description="Hex API base URL (hex source).")
    hex_repo_url: str | None = Field(None, description="Hex repository base URL.")
    github_api_url: str | None = Field(None, description="GitHub API base URL.")
    github_token: str | None = Field(None, description="GitHub token for the GraphQL API.")
    http_user_agent: str = Field(
        "exforge/0.1 (+https://exforge.dev/crawler)", description="User-Agent of source clients."
    )
    http_concurrency: PositiveInt = Field(4, description="Concurrent requests per source client.")
    http_retries: PositiveInt = Field(6, description="Attempts per request (timeouts, 5xx).")
    http_backoff_s: float = Field(
        0.5, gt=0, description="First retry delay; doubles per attempt, with full jitter."
    )
    http_timeout_s: float = Field(30.0, gt=0, description="Timeout of one source request.")
    http_secondary_wait_s: float = Field(
        60.0,
        gt=0,
        description="Wait after a rate limit that names no time (GitHub asks for at least "
        "60 s); doubles while it repeats.",
    )
    archive_max_compressed_bytes: PositiveInt = Field(
        16 * 1024 * 1024, description="Largest archive accepted as fetched (compressed)."
    )
    archive_max_uncompressed_bytes: PositiveInt = Field(
        128 * 1024 * 1024, description="Largest total uncompressed size of an archive."
    )
    archive_max_member_bytes: PositiveInt = Field(
        16 * 1024 * 1024, description="Largest single file inside an archive."
    )
    license_allowlist: str = Field(
        "MIT,MIT-0,Apache-2.0,BSD-2-Clause,BSD-3-Clause,ISC,0BSD,Unlicense,Zlib,CC0-1.0,BSL-1.0",
        description="Comma-separated SPDX ids a source may be trained on.",
    )
    shard_samples: PositiveInt = Field(
        512, description="A shard closes at this many samples (or at `shard_tokens`)."
    )
    shard_tokens: PositiveInt = Field(
        1_000_000, description="A shard closes once its samples hold this many Tekken tokens."
    )
    shard_parquet: bool = Field(False, description="Also write a Parquet copy of every shard.")
    shard_max_hold_s: float = Field(
        300.0,
        gt=0,
        description=(
            "Longest a staged sample waits for a full shard when the pipeline never drains "
            "(shards are otherwise sealed when it drains)."
        ),
    )
    validation_fraction: float = Field(
        0.02, ge=0, le=1, description="Share of samples in the validation split (stable hash)."
    )
    instruct_kinds: str = Field(
        "", description="Comma-separated sample kinds to generate; empty: every kind."
    )
    sample_max_tokens: PositiveInt = Field(
        16_384, description="Drop samples longer than this many Tekken tokens."
    )
    check_workers: PositiveInt = Field(
        2, description="Warm BEAM VMs that check the code of generated samples."
    )
    tokenizer_path: Path | None = Field(
        None, description="Model directory or tekken.json; unset: mistral-common's Tekken."
    )
    dataset: str = Field("elixir", description="Dataset name used in shard keys.")
    claim_check_bytes: PositiveInt = Field(
        64 * 1024, description="Payloads larger than this go to the store, by reference."
    )
    idle_seconds: float = Field(
        3.0, gt=0, description="Quiet time after which a stage counts as idle."
    )
    kafka_session_timeout_s: float = Field(
        10.0,
        ge=1,
        description=(
            "Consumer-group session timeout of a worker: a member silent this long leaves the "
            "group (the embedded broker also lets a new group form for half of it)."
        ),
    )
    producer_linger_ms: float = Field(
        10.0,
        ge=0,
        description=(
            "How long a worker's producer waits for more records of a partition before"
            " sending them: fewer, larger record batches, which the broker handles per batch."
        ),
    )
    producer_batch_bytes: PositiveInt = Field(
        1024 * 1024,
        description=(
            "Largest record batch a worker's producer builds for a partition (the client's"
            " default is 16 KiB): with `producer_linger_ms`, fewer stored batches, which the"
            " broker lists again on every fetch of the partition."
        ),
    )
    stall_seconds: float = Field(
        10.0,
        gt=0,
        description=(
            "A quiet worker reports and re-fetches an assigned partition whose lag has not"
            " moved for this long."
        ),
    )
    worker_stop_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Longest a stopping worker (SIGTERM, SIGINT, `--until-idle`) waits for the broker"
            " to acknowledge its outputs and take its commits; then it logs what it could not"
            " deliver or commit and exits with status 75 (those inputs are consumed again"
            " when a worker restarts)."
        ),
    )
    metrics_port: Port = Field(
        9464,
        description="Worker Prometheus /metrics port; 0: off (`--processes N`: N ports from it).",
    )
    progress_interval_s: float = Field(
        30.0, ge=0, description="Seconds between a worker's one-line progress logs; 0: off."
    )
    table_store: Literal["memory", "rocksdb"] = Field(
        "memory",
        description=(
            "Store of the dedup and near-dup tables: `rocksdb` keeps them on disk under the "
            "data dir (bounded memory, fast restarts), `memory` rebuilds them from their "
            "changelogs at start (tests, the demo)."
        ),
    )
    table_cache_mb: PositiveInt = Field(
        16,
        description=(
            "RocksDB memory of a worker process's tables, MiB: one block cache shared by "
            "every table and partition, their write buffers and index blocks charged to it "
            "(small, so that it is full early and a worker's memory does not grow with the "
            "data)."
        ),
    )
    log_level: str = Field("INFO", description="Log level of the worker and CLI.")
    eval_timeout_s: float = Field(
        5.0, gt=0, description="Wall-clock limit of one evaluated candidate (seconds)."
    )
    eval_memory_mb: PositiveInt = Field(
        1024, description="Address-space limit (RLIMIT_AS) of one sandbox VM, in MiB."
    )
    eval_workers: int = Field(0, ge=0, description="Warm sandbox VMs; 0: one per CPU.")
    eval_max_uses: int = Field(
        0, ge=0, description="Candidates per sandbox VM before it is replaced; 0: while clean."
    )
    eval_gate_benchmark: str = Field(
        "builtin", description="Benchmark whose pass@1 gates `exforge models promote`."
    )
    eval_gate_max_drop: float = Field(
        0.02, ge=0, description="Largest pass@1 drop below production a promotion may have."
    )
    quality_max_line_length: PositiveInt = Field(
        1000, description="Drop files with a line longer than this (characters)."
    )
    quality_max_mean_line_length: float = Field(
        100.0, gt=0, description="Drop files whose mean line length is above this."
    )
    quality_min_alphanumeric_fraction: float = Field(
        0.25, ge=0, le=1, description="Drop files with a smaller alphanumeric fraction."
    )
    quality_min_loc: int = Field(5, ge=0, description="Drop files with fewer lines of code.")
    quality_max_loc: PositiveInt = Field(10_000, description="Drop files with more lines of code.")
    quality_max_depth: PositiveInt = Field(
        500,
        description="Drop files whose syntax tree nests deeper than this (the real-code "
        "corpus reaches 39): the analysis recurses per level.",
    )
    quality_max_blob_chars: PositiveInt = Field(
        256, description="Drop files with a base64 run this long (hex: half as long)."
    )
    decontamination_files: tuple[Path, ...] = Field(
        DEFAULT_BENCHMARKS,
        description="Benchmark JSONL files (`prompt`/`tests` fields) to decontaminate "
        "against, as a JSON list (relative: to the exforge checkout); []: off.",
    )
    decontamination_ngram: PositiveInt = Field(
        8, description="Word n-gram size of the decontamination check."
    )
    decontamination_threshold: float = Field(
        0.5, gt=0, le=1, description="Share of a benchmark text's n-grams that contaminates."
    )
    neardup_threshold: float = Field(
        0.7, gt=0, lt=1, description="Jaccard similarity of near-duplicates (MinHash LSH)."
    )
    neardup_max_hold_s: float = Field(
        300.0,
        gt=0,
        description=(
            "Longest a new file waits for its near-duplicate decision when the pipeline "
            "never drains (steady inflow)."
        ),
    )
    neardup_decide_chunk: PositiveInt = Field(
        256,
        description=(
            "Most held files one near-dup `decide` event decides: a batch is decided in "
            "chunks, one after another, so a worker's memory does not grow with the batch."
        ),
    )
    backup_interval_s: float = Field(
        0.0,
        ge=0,
        description="`exforge backup schedule` takes a backup when the newest is this old "
        "(seconds); 0: no scheduled backups.",
    )
    backup_keep: PositiveInt = Field(
        7, description="Backups kept by the schedule and `backup prune`; older ones go."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(CONFIG_FILE_ENV, "exforge.toml"))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    @property
    def root(self) -> Path:
        return self.data_dir.resolve()

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.embedded_kafka_port}"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or (self.root / "store").as_uri()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'exforge.db'}"

    @property
    def resolved_decontamination_files(self) -> tuple[Path, ...]:
        return tuple(p if p.is_absolute() else PROJECT_ROOT / p for p in self.decontamination_files)

    @property
    def worker_group(self) -> str:
        """Consumer group (and Faust app id) of the stage worker."""
        return f"{self.topic_prefix}worker"

    @property
    def license_allow(self) -> frozenset[str]:
        """The allow-list as SPDX ids (case as written; compared case-insensitively)."""
        return frozenset(x.strip() for x in self.license_allowlist.split(",") if x.strip())


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning a validation failure into one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None


def describe_settings() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for docs and `--help`."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default)
        rows.append((f"{ENV_PREFIX}{name.upper()}", default, field.description or ""))
    return rows
