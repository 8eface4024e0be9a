"""Prometheus metrics shared by both transports and the engine."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "rewardserve_requests_total",
    "Requests by transport, route and status code",
    ["transport", "route", "code"],
)
LATENCY = Histogram(
    "rewardserve_request_seconds",
    "Request latency",
    ["transport", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "rewardserve_batch_size",
    "Items per forward batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD_SECONDS = Histogram(
    "rewardserve_forward_seconds",
    "Time of one batch forward",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUEUE_DEPTH = Gauge("rewardserve_queue_depth", "Items waiting to be scored", ["model"])
TOKENS = Counter("rewardserve_tokens_total", "Tokens scored (rate() gives tokens/s)", ["model"])
ITEMS = Counter("rewardserve_items_total", "Items scored", ["model"])
DROPPED = Counter(
    "rewardserve_dropped_items_total",
    "Items dropped before their forward, by reason: cancelled (the caller went away), "
    "expired (its deadline passed), failed (a sibling item failed, the loop died, unloaded)",
    ["model", "reason"],
)
LOOP_FAILURES = Counter(
    "rewardserve_batcher_failures_total",
    "Times a model's batcher loop died (each is followed by a restart, up to the limit)",
    ["model"],
)
REJECTED = Counter(
    "rewardserve_rejected_requests_total", "Requests refused by admission", ["model"]
)
BON_RUNNING = Gauge("rewardserve_bon_running", "Best-of-N requests admitted and not finished")
