"""Prometheus metrics of the stage worker; names are referenced by deploy/ (keep in sync)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES_IN = Counter("exforge_messages_in_total", "Messages consumed by a stage.", ["stage"])
MESSAGES_OUT = Counter(
    "exforge_messages_out_total", "Messages produced by a stage.", ["stage", "topic"]
)
DLQ_MESSAGES = Counter(
    "exforge_dlq_messages_total", "Messages a stage sent to the DLQ.", ["stage", "error_class"]
)
DROPPED = Counter(
    "exforge_dropped_total", "Items a stage dropped on purpose, by reason.", ["stage", "reason"]
)
STAGE_LATENCY = Histogram(
    "exforge_stage_latency_seconds",
    "Time a stage spends on one message (a batch, for batch stages): its busy time.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STAGE_WAIT = Counter(
    "exforge_stage_wait_seconds",
    "Time a stage spent waiting for its next input message.",
    ["stage"],
)
ITEMS = Counter(
    "exforge_items",
    "Items a stage handled, by unit (packages, files, samples).",
    ["stage", "unit"],
)
CONSUMER_LAG = Gauge(
    "exforge_consumer_lag",
    "Messages not yet consumed by the worker group.",
    ["group", "topic", "partition"],
)
STALLED_PARTITIONS = Gauge(
    "exforge_stalled_partitions",
    "Assigned partitions with lag whose committed offset stood still (stall_seconds).",
)
ANOMALY = Gauge(
    "exforge_anomaly", "1 while a signal departs from its baseline.", ["signal", "subject"]
)
ANOMALY_SCORE = Gauge(
    "exforge_anomaly_score", "Robust z-score of a signal's last observation.", ["signal", "subject"]
)
CHECK_POOL_EVENTS = Counter(
    "exforge_check_pool_events",
    "Mishaps of the instruct stage's check pool (streams.generators.check): batch_rerun (a "
    "batch program that did not reach its end, its candidates run again one per program), "
    "timeout (a check program that ran out of time), vm_replaced (a check VM killed and "
    "booted again after a program).",
    ["event"],
)
REDACTIONS = Counter(
    "exforge_redactions_total", "Secrets and PII replaced in kept files, by kind.", ["kind"]
)
SHARDS_WRITTEN = Counter(
    "exforge_shards_written_total", "Training shards sealed.", ["dataset", "stage", "split"]
)
TRAIN_LOSS = Gauge("exforge_train_loss", "Training loss of the last step.", ["run", "stage"])
TRAIN_LR = Gauge("exforge_train_learning_rate", "Learning rate of the last step.", ["run", "stage"])
TRAIN_GRAD_NORM = Gauge(
    "exforge_train_grad_norm", "Gradient norm (before clipping), last step.", ["run", "stage"]
)
TRAIN_TOKENS_PER_S = Gauge(
    "exforge_train_tokens_per_second", "Trained tokens per second, last step.", ["run", "stage"]
)
TRAIN_PEAK_MEMORY = Gauge(
    "exforge_train_peak_memory_bytes", "Peak GPU (else process) memory of training.", ["run"]
)

METRIC_NAMES = (
    "exforge_messages_in_total",
    "exforge_messages_out_total",
    "exforge_dlq_messages_total",
    "exforge_dropped_total",
    "exforge_stage_latency_seconds",
    "exforge_stage_wait_seconds_total",
    "exforge_items_total",
    "exforge_consumer_lag",
    "exforge_stalled_partitions",
    "exforge_anomaly",
    "exforge_anomaly_score",
    "exforge_shards_written_total",
    "exforge_redactions_total",
    "exforge_check_pool_events_total",
    "exforge_train_loss",
    "exforge_train_learning_rate",
    "exforge_train_grad_norm",
    "exforge_train_tokens_per_second",
    "exforge_train_peak_memory_bytes",
)


def serve_metrics(port: int) -> bool:
    """Expose /metrics on `port` (0 disables it); False, with a warning, if it is taken."""
    if not port:
        return False
    try:
        start_http_server(port)
    except OSError as exc:
        logging.getLogger("exforge.telemetry").warning(
            "cannot serve /metrics on port %d (%s); set EXFORGE_METRICS_PORT", port, exc
        )
        return False
    return True
