"""Requests that are not even HTTP: counted, and logged in one short line.

aiohttp logs each request it cannot parse (a header line over 8 KiB, a bad chunk size) at ERROR
with a full traceback, so any client could flood the log. The filter turns such a record into
one line at INFO, dropped unless the log level admits it, and counts it.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"


class MalformedRequests(logging.Filter):
    """A filter for aiohttp's server logger; ``count`` is how many requests it rewrote."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.count += 1
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = " ".join(str(exc.message).split())[:200]
        record.msg = "malformed request from %s: %d %s"
        record.args = (peer, exc.code, reason)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(SERVER_LOGGER).isEnabledFor(logging.INFO)


def install() -> MalformedRequests:
    """Attach the filter to aiohttp's server logger (once per process)."""
    logger = logging.getLogger(SERVER_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, MalformedRequests):
            return existing
    installed = MalformedRequests()
    logger.addFilter(installed)
    return installed
