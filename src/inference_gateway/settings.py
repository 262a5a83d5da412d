"""Settings, read once from the environment at start-up into one frozen object.

The variable names are those of the original Tembo Inference Server, so existing deployments keep
working. No other module reads the environment: the settings object is passed down.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(Exception):
    """A setting has a value the gateway cannot use; the message names the variable."""


def parse_pairs(value: str, sep: str, what: str) -> dict[str, str]:
    """Parse ``a<sep>b,c<sep>d`` into a dict, rejecting anything ambiguous."""
    pairs: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        key, found, target = item.partition(sep)
        key, target = key.strip(), target.strip()
        if not found or not key or not target:
            raise ValueError(f"expected {what}, got {item!r}")
        if key in pairs:
            raise ValueError(f"{key!r} is given twice")
        pairs[key] = target
    return pairs


# The original server's default: one model on the local vLLM.
_ORIGINAL_MODEL: dict[str, tuple[str, ...]] = {"facebook/opt-125m": ("http://localhost:8000",)}
DNS_SCHEMES = ("dns+http://", "dns+https://")  # a name to resolve, every address a replica


def check_url(name: str, url: str) -> str:
    """A model server's base URL, checked the way the gateway will use it; without a final /.

    ``dns+http://name:port`` names every address the name resolves to (a Kubernetes headless
    Service, say); its port must be given.
    """
    dns = url.startswith(DNS_SCHEMES)
    plain = url.removeprefix("dns+")
    if not plain.startswith(("http://", "https://")):
        raise ValueError(f"the URL of {name!r} must start with http://, https:// or dns+http://, "
                         f"got {url!r}")
    parts = urlsplit(plain)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the URL of {name!r} has a port that is not a number from 1 to 65535: "
                         f"{url!r}") from None
    if not parts.hostname or any(c.isspace() for c in url) or "://" in parts.netloc + parts.path:
        raise ValueError(f"the URL of {name!r} is not one URL with a host: {url!r}")
    if port == 0 or parts.query or parts.fragment:
        raise ValueError(f"the URL of {name!r} must be http(s)://host[:port][/path]: {url!r}")
    if dns and port is None:
        raise ValueError(f"the DNS name of {name!r} needs a port: {url!r}")
    return url.rstrip("/")


def parse_replicas(name: str, value: str) -> tuple[str, ...]:
    """One model's servers: ``url``, or several joined with ``|`` (a URL cannot hold one)."""
    urls = tuple(check_url(name, u.strip()) for u in value.split("|"))
    if len(set(urls)) != len(urls):
        raise ValueError(f"a server of {name!r} is given twice: {value!r}")
    return urls


class ModelPrice(NamedTuple):
    """What a model's tokens cost, in ``PRICE_CURRENCY`` per million tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal  # the part of the prompt read from the prefix cache


def parse_prices(value: object) -> object:
    """``MODEL_PRICES``: ``model=input:output[:cached_input],...``; cached defaults to input."""
    if not isinstance(value, str):
        return value
    prices: dict[str, ModelPrice] = {}
    for model, spec in parse_pairs(value, "=", "model=input:output[:cached_input]").items():
        try:
            numbers = [Decimal(part) for part in spec.split(":")]
        except InvalidOperation:
            raise ValueError(f"the prices of {model!r} are not numbers: {spec!r}") from None
        if not 2 <= len(numbers) <= 3 or not all(n.is_finite() and n >= 0 for n in numbers):
            raise ValueError(f"expected input:output[:cached_input] prices of {model!r}, each a "
                             f"number of at least 0, got {spec!r}")
        prices[model] = ModelPrice(numbers[0], numbers[1], numbers[-1] if len(numbers) == 3
                                   else numbers[0])
    return prices


class Settings(BaseSettings):
    """Every knob of the gateway. Field names match the environment variables, upper-cased."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    database_url: str = "postgresql://postgres:postgres@localhost:5432/postgres"
    # model → its servers (several vLLM replicas, or a DNS name that resolves to them)
    model_service_port_map: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=lambda: dict(_ORIGINAL_MODEL)
    )
    model_rewrites: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    webserver_host: str = "0.0.0.0"
    webserver_port: int = Field(default=8080, ge=1, le=65535)
    webserver_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    # What serves the forwarded /v1 endpoints: aiohttp's server, or the protocol-level core
    # (proxy/http), which measured short of the 1.5x that would make it the default
    # (docs/performance.md, "The server core"). The rest of the port is aiohttp's either way.
    http_core: Literal["aiohttp", "protocol"] = "aiohttp"

    org_auth_enabled: bool = False
    org_auth_cache_refresh_interval_sec: float = Field(default=10.0, gt=0)
    auth_mode: Literal["headers", "keys", "either"] = "either"
    api_key_cache_refresh_interval_sec: float = Field(default=10.0, gt=0)

    migrate_on_start: bool = True
    max_request_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    upstream_connect_timeout_sec: float = Field(default=5.0, gt=0)
    upstream_timeout_sec: float = Field(default=600.0, gt=0)
    upstream_max_connections: int = Field(default=1000, ge=1)  # idle keep-alive, per server
    # Which /v1 endpoints are forwarded (None: every one the gateway can meter); the request
    # path checks the names against what it can meter (see proxy.endpoints).
    forwarded_endpoints: Annotated[tuple[str, ...] | None, NoDecode] = None
    max_n: int | None = Field(default=128, ge=1)  # the most choices one request may ask for
    scrape_replica_load: bool = True  # read each replica's /metrics about once a second
    prefix_affinity_chars: int = Field(default=0, ge=0)  # 0: off; else the prefix that is hashed
    max_tokens: int | None = Field(default=None, ge=1)  # the most tokens one may ask to generate

    usage_batch_size: int = Field(default=1000, ge=1, le=100_000)
    usage_flush_interval_ms: int = Field(default=50, ge=1)
    spool_dir: Path = Path("spool")
    spool_sync: Literal["batch", "always", "never"] = "batch"
    spool_segment_bytes: int = Field(default=16 * 1024 * 1024, ge=4096)
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=4096)
    spool_min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    spool_full_policy: Literal["spill", "refuse", "drop"] = "spill"
    writer_max_backoff_sec: float = Field(default=30.0, gt=0)

    # Partition maintenance (pg_partman, scheduled by pg_cron where it exists).
    requests_retention: str = "13 months"
    retention_keep_table: bool = False  # true: detach old partitions instead of dropping them
    maintenance_schedule: str = "0 2 * * *"  # cron syntax, GMT
    maintenance_warn_after_sec: float = Field(default=300.0, gt=0)
    run_maintenance_scheduler: bool = True  # where pg_cron is missing, the gateway runs it

    # Billing reporter.
    run_billing_reporter: bool = False
    billing_period_sec: float = Field(default=3600.0, gt=0)
    billing_sink: Literal["outbox", "pgmq", "webhook"] = "outbox"
    queue_conn_url: str | None = None
    billing_queue_name: str = "billing_usage"
    billing_webhook_url: str | None = None
    billing_grace_sec: float = Field(default=300.0, ge=0)  # wait this long after an hour ends
    billing_webhook_timeout_sec: float = Field(default=10.0, gt=0)
    billing_webhook_retries: int = Field(default=4, ge=0)

    log_level: str = "INFO"

    # The usage API, its rollups and the dashboard (see docs/usage-api.md).
    admin_token: str | None = Field(default=None, min_length=32)  # reads every org's usage
    run_usage_rollups: bool = True
    usage_rollup_interval_sec: float = Field(default=5.0, gt=0)
    usage_fresh_tail_sec: float = Field(default=60.0, ge=0)  # the newest rows, read unrolled
    model_prices: Annotated[dict[str, ModelPrice], NoDecode, BeforeValidator(parse_prices)] = \
        Field(default_factory=dict)
    price_currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")

    # Rate limits and quotas (see docs/limits.md): counters shared through Redis.
    redis_url: str | None = None
    redis_timeout_sec: float = Field(default=1.0, gt=0)
    rate_limit_fallback: Literal["local", "open", "closed"] = "local"  # while Redis is away
    gateway_instances: int = Field(default=1, ge=1)  # how many gateways share the limits
    rate_limit_reserved_tokens: int = Field(default=4096, ge=1)  # most a request reserves
    rate_limit_leases: bool = True  # each process holds spare room while a limit has plenty
    limits_refresh_interval_sec: float = Field(default=30.0, gt=0)

    # Metrics, the access log and traces (see docs/metrics.md).
    metrics_enabled: bool = True  # GET /metrics, and the request path's counters behind it
    metrics_dir: Path | None = None  # where the workers share their numbers; SPOOL_DIR/metrics
    metrics_max_orgs: int = Field(default=20, ge=0)  # organizations with a label; rest "other"
    metrics_token: str | None = Field(default=None, min_length=16)  # bearer for /metrics
    access_log: Literal["off", "json"] = "off"  # json: one line per request on stdout
    otel_traces_exporter: Literal["none", "otlp"] = "none"  # otlp needs the [otel] extra
    otel_exporter_otlp_endpoint: str = "http://localhost:4318"  # OTLP over HTTP
    otel_service_name: str = "inference-gateway"

    @field_validator("model_service_port_map", mode="before")
    @classmethod
    def _parse_port_map(cls, value: object) -> object:
        if isinstance(value, str):
            return {name: parse_replicas(name, urls)
                    for name, urls in parse_pairs(value, "=", "name=url[|url...]").items()}
        return value

    @field_validator("forwarded_endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            paths = tuple(p.strip() for p in value.split(",") if p.strip())
            if not paths:
                raise ValueError("name at least one endpoint")
            return paths
        return value

    @field_validator("max_n", "max_tokens", mode="before")
    @classmethod
    def _none_for_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") \
            else value

    @field_validator("model_rewrites", mode="before")
    @classmethod
    def _parse_rewrites(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_pairs(value, ":", "alias:target")
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "settings"
            lines.append(f"invalid {name}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for alias, target in settings.model_rewrites.items():
        if target not in settings.model_service_port_map:
            raise ConfigError(
                f"invalid MODEL_REWRITES: {alias!r} points to {target!r}, "
                "which is not in MODEL_SERVICE_PORT_MAP"
            )
    return settings
