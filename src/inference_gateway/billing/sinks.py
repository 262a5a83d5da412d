"""Where billing messages go from the outbox, chosen by ``BILLING_SINK``.

* ``outbox`` (the default): nowhere; consumers read ``billing.outbox`` and acknowledge.
* ``pgmq``: ``pgmq.send`` to ``BILLING_QUEUE_NAME`` in the database at ``QUEUE_CONN_URL``, as the
  original server did (the queue is created if missing; PGMQ itself must be installed there).
* ``webhook``: a POST of each message as a structured-mode CloudEvent to
  ``BILLING_WEBHOOK_URL``, retried with backoff on network errors, timeouts, 408, 429 and 5xx.

A sink raises when a message was not accepted; the reporter then keeps it for the next attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
import asyncpg
import orjson

from inference_gateway.settings import ConfigError, Settings

CLOUDEVENT_SOURCE = "/inference-gateway/billing"
CLOUDEVENT_TYPE = "inference-gateway.usage.hourly"
CLOUDEVENT_CORRECTION_TYPE = "inference-gateway.usage.correction"
_RETRYABLE = frozenset({408, 425, 429})
_MAX_BACKOFF_SEC = 8.0


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    message_id: uuid.UUID
    period_start: datetime
    correction: bool
    body: str  # JSON: {"id": ..., "message": [events]}
    created_at: datetime


class Sink(Protocol):
    async def send(self, message: OutboxMessage) -> None: ...
    async def close(self) -> None: ...


class SinkError(Exception):
    """The sink did not accept a message."""


def open_sink(settings: Settings) -> Sink | None:
    """The sink the settings choose; None for the outbox, which needs no delivery."""
    if settings.billing_sink == "pgmq":
        if not settings.queue_conn_url:
            raise ConfigError("invalid QUEUE_CONN_URL: required when BILLING_SINK=pgmq")
        return PgmqSink(settings.queue_conn_url, settings.billing_queue_name)
    if settings.billing_sink == "webhook":
        url = settings.billing_webhook_url
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(
                "invalid BILLING_WEBHOOK_URL: an http(s) URL is required when BILLING_SINK=webhook"
            )
        return WebhookSink(url, settings.billing_webhook_timeout_sec,
                           settings.billing_webhook_retries)
    return None


class PgmqSink:
    def __init__(self, dsn: str, queue: str) -> None:
        self._dsn = dsn
        self._queue = queue
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self._dsn, timeout=10)
            try:
                await conn.execute("SELECT pgmq.create($1)", self._queue)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    async def send(self, message: OutboxMessage) -> None:
        conn = await self._connection()
        try:
            await conn.fetchval("SELECT pgmq.send($1::text, $2::jsonb)", self._queue, message.body)
        except (OSError, asyncpg.InterfaceError):
            conn.terminate()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=2)


def cloudevent(message: OutboxMessage) -> bytes:
    """The message as a CloudEvents 1.0 JSON envelope; its id is stable across retries."""
    return orjson.dumps({
        "specversion": "1.0",
        "id": str(message.message_id),
        "source": CLOUDEVENT_SOURCE,
        "type": CLOUDEVENT_CORRECTION_TYPE if message.correction else CLOUDEVENT_TYPE,
        "subject": f"{message.period_start.astimezone(UTC):%Y-%m-%dT%H:00:00Z}",
        "time": message.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": orjson.Fragment(message.body),
    })


class WebhookSink:
    def __init__(self, url: str, timeout: float, retries: int, backoff: float = 0.5) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    async def send(self, message: OutboxMessage) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = cloudevent(message)
        headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
        attempt = 0
        while True:
            try:
                async with self._session.post(self._url, data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        return
                    error = SinkError(f"webhook answered HTTP {resp.status}")
                    if resp.status < 500 and resp.status not in _RETRYABLE:
                        raise error
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = SinkError(f"webhook unreachable: {type(exc).__name__}: {exc}")
            if attempt >= self._retries:
                raise error
            await asyncio.sleep(min(self._backoff * 2**attempt, _MAX_BACKOFF_SEC))
            attempt += 1

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
