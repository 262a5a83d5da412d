"""Every metric ``/metrics`` serves: name, type, help, labels and how workers' values combine.

One list, so that the exposition, the merge across worker processes and docs/metrics.md cannot
disagree. Where the OpenTelemetry GenAI semantic conventions name a metric, the name is theirs
in its Prometheus form (dots to underscores, the unit ``s`` as ``_seconds``, ``{token}``
dropped), with their attributes as labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
# How the workers' values of a series combine: summed, the largest, the smallest, or the oldest
# of the timestamps (shown as an age in seconds).
Merge = Literal["sum", "max", "min", "age"]

GEN_AI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
PROVIDER = "vllm"

# The conventions' advisory bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
# The gateway's own time is a fraction of a millisecond: buckets fine enough to see it move.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    merge: Merge = "sum"
    live_only: bool = False  # a gauge of the workers that are running, not of those that died


def _f(name: str, kind: Kind, text: str, labels: tuple[str, ...] = (), *,
       buckets: tuple[float, ...] = (), merge: Merge = "sum") -> Family:
    return Family(name, kind, text, labels, buckets, merge, live_only=kind == "gauge")


REQUESTS = _f("gateway_requests_total", "counter",
              "Requests forwarded to a model server, each one row of inference.requests.",
              ("model", "endpoint", "status_class"))
IN_FLIGHT = _f("gateway_requests_in_flight", "gauge", "Requests being served now.")
REJECTED = _f("gateway_rejected_requests_total", "counter",
              "Requests the gateway answered itself, without a model server (no usage row).",
              ("endpoint", "status", "code"))
RATE_LIMITED = _f("gateway_rate_limited_total", "counter",
                  "Requests refused with a 429 by the rate limiter.", ("code",))
MALFORMED = _f("gateway_malformed_requests_total", "counter",
               "Requests that were not HTTP at all (aiohttp could not parse them).")

SERVER_DURATION = _f("gen_ai_server_request_duration_seconds", "histogram",
                     "Time from the request's arrival to its usage record (the last byte "
                     "relayed).", (*GEN_AI, "error_type"), buckets=DURATION_BUCKETS)
TTFT = _f("gen_ai_server_time_to_first_token_seconds", "histogram",
          "Streams: time from the request's arrival to the first event written to the client.",
          GEN_AI, buckets=TTFT_BUCKETS)
TPOT = _f("gen_ai_server_time_per_output_token_seconds", "histogram",
          "Streams: time after the first event, per output token after the first.",
          GEN_AI, buckets=TPOT_BUCKETS)
CLIENT_DURATION = _f("gen_ai_client_operation_duration_seconds", "histogram",
                     "The upstream call: from sending to the model server to the end of its "
                     "answer.", (*GEN_AI, "error_type"), buckets=DURATION_BUCKETS)
TTFB = _f("gateway_time_to_first_byte_seconds", "histogram",
          "Time from the request's arrival to the first byte of the model server's answer.",
          ("model", "endpoint"), buckets=DURATION_BUCKETS)
OVERHEAD = _f("gateway_overhead_seconds", "histogram",
              "The gateway's own time: before the request was sent upstream, and from the end "
              "of the answer to its usage record.", ("model", "endpoint"),
              buckets=OVERHEAD_BUCKETS)

TOKENS = _f("gateway_tokens_total", "counter",
            "Tokens metered (prompt, completion, and cached: the part of the prompt read from "
            "the prefix cache), by organization (the biggest, the rest as other).",
            ("model", "organization", "type"))
TOKEN_USAGE = _f("gen_ai_client_token_usage", "histogram",
                 "Tokens per request, as metered.", (*GEN_AI, "gen_ai_token_type"),
                 buckets=TOKEN_BUCKETS)

_REPLICA = ("model", "replica")
REPLICA_UP = _f("gateway_replica_up", "gauge",
                "1 while the replica passes its health probe in every worker.", _REPLICA,
                merge="min")
REPLICA_STATE = _f("gateway_replica_state", "gauge",
                   "1 for each state the replica is in, as some worker sees it.",
                   (*_REPLICA, "state"), merge="max")
REPLICA_IN_FLIGHT = _f("gateway_replica_requests_in_flight", "gauge",
                       "Requests on the replica now.", _REPLICA)
REPLICA_REQUESTS = _f("gateway_replica_requests_total", "counter",
                      "Requests sent to the replica (a retry counts on both).", _REPLICA)
REPLICA_ERRORS = _f("gateway_replica_errors_total", "counter",
                    "Requests that failed on the replica before any byte came back.", _REPLICA)
BILLED = _f("gateway_replica_billed_tokens_total", "counter",
            "Tokens billed for answers from the replica.", (*_REPLICA, "type"))
EXPECTED = _f("gateway_replica_expected_vllm_tokens_total", "counter",
              "How far the replica's own vLLM counters should have moved for what was billed: "
              "the prompt once per choice (n), the completion as billed.",
              (*_REPLICA, "type"))
VLLM = _f("gateway_replica_vllm_tokens_total", "counter",
          "The replica's own counters at the last scrape (vllm:prompt_tokens_total, "
          "vllm:generation_tokens_total).", (*_REPLICA, "type"), merge="max")


def _usage(name: str, kind: Kind, text: str, merge: Merge = "sum") -> Family:
    """A family of the usage pipeline: the spool, the writer, Postgres."""
    return _f(f"gateway_usage_{name}", kind, text, merge=merge)


SPOOL_RECORDS = _usage("spool_records", "gauge", "Usage records spooled, not yet in Postgres.")
SPOOL_BYTES = _usage("spool_bytes", "gauge", "Bytes of usage spooled, not yet in Postgres.")
OLDEST = _usage("oldest_unwritten_age_seconds", "gauge",
                "Age of the oldest usage record not yet in Postgres (0: none).", "age")
ROWS_WRITTEN = _usage("rows_written_total", "counter", "Usage rows COPYed into Postgres.")
COPY_BATCHES = _usage("copy_batches_total", "counter", "Batches committed to Postgres.")
COPY_FAILURES = _usage("copy_failures_total", "counter", "Writes that failed (and are retried).")
DEAD_LETTERS = _usage("dead_letters_total", "counter", "Records moved to the dead letters.")
DROPPED = _usage("records_dropped_total", "counter", "Records dropped: the spool was full.")
DATABASE_UP = _usage("database_up", "gauge", "1 while every worker's writer reaches Postgres.",
                     "min")
CACHE_AGE = _f("gateway_tenant_cache_age_seconds", "gauge",
               "Time since the tenant cache was last loaded from Postgres (the stalest worker).",
               ("cache",), merge="age")
BILLING_LAG = _f("gateway_billing_lag_seconds", "gauge",
                 "Time since the end of the last hour the billing reporter reported.")
BILLING_RUN = _f("gateway_billing_last_run_timestamp_seconds", "gauge",
                 "When the billing reporter last completed a pass (Unix time).")
WORKERS = _f("gateway_metrics_workers", "gauge",
             "Worker processes whose numbers this page includes.")

FAMILIES: tuple[Family, ...] = (
    REQUESTS, IN_FLIGHT, REJECTED, RATE_LIMITED, MALFORMED,
    SERVER_DURATION, TTFT, TPOT, CLIENT_DURATION, TTFB, OVERHEAD,
    TOKENS, TOKEN_USAGE,
    REPLICA_UP, REPLICA_STATE, REPLICA_IN_FLIGHT, REPLICA_REQUESTS, REPLICA_ERRORS,
    BILLED, EXPECTED, VLLM,
    SPOOL_RECORDS, SPOOL_BYTES, OLDEST, ROWS_WRITTEN, COPY_BATCHES, COPY_FAILURES, DEAD_LETTERS,
    DROPPED, DATABASE_UP, CACHE_AGE, BILLING_LAG, BILLING_RUN, WORKERS,
)
BY_NAME = {family.name: family for family in FAMILIES}

# gen_ai.operation.name of each endpoint: the conventions' names where one applies.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/chat/completions/batch": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/score": "score",
    "/v1/rerank": "rerank",
    "/v1/messages/count_tokens": "count_tokens",
}


def operation(endpoint: str) -> str:
    """The operation of an endpoint; reading or cancelling a stored response is ``retrieve``."""
    return OPERATIONS.get(endpoint) or ("retrieve" if endpoint.startswith("/v1/responses/")
                                        else "other")
