"""Gateway Prometheus metrics (served on the gateway's own /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "exforge_gateway_requests_total",
    "Gateway generation requests by model, serving version and HTTP status.",
    ["model", "version", "status"],
)
LATENCY_METRIC = "exforge_gateway_request_seconds"
LATENCY = Histogram(
    LATENCY_METRIC,
    "Time from request to last token.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "exforge_gateway_ttft_seconds",
    "Time to the first token.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "exforge_gateway_tokens_total",
    "Tokens served, by model, version and kind (prompt, completion).",
    ["model", "version", "kind"],
)
QUEUE_DEPTH = Gauge("exforge_gateway_queue_depth", "Requests waiting for a generation slot.")
RUNNING = Gauge("exforge_gateway_running", "Generations in progress.")
CACHE = Counter("exforge_gateway_cache_total", "Exact-match cache lookups.", ["result"])
FAILOVERS = Counter(
    "exforge_gateway_failovers_total",
    "Requests retried elsewhere before the first token.",
    ["reason"],
)
ROLLBACKS = Counter("exforge_gateway_rollbacks_total", "Automatic rollbacks.", ["model"])
BACKEND_UP = Gauge("exforge_gateway_backend_up", "Triton endpoint health (1 ready).", ["endpoint"])
CANARY_PERCENT = Gauge("exforge_gateway_canary_percent", "Canary share of traffic.", ["model"])

METRIC_NAMES = (
    "exforge_gateway_requests_total",
    "exforge_gateway_request_seconds",
    "exforge_gateway_ttft_seconds",
    "exforge_gateway_tokens_total",
    "exforge_gateway_queue_depth",
    "exforge_gateway_running",
    "exforge_gateway_cache_total",
    "exforge_gateway_failovers_total",
    "exforge_gateway_rollbacks_total",
    "exforge_gateway_backend_up",
    "exforge_gateway_canary_percent",
)
