from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from inference_gateway.observability.malformed_requests import SERVER_LOGGER, install


def test_unparsable_requests_log_one_short_line(caplog: pytest.LogCaptureFixture) -> None:
    counter = install()
    assert install() is counter  # once per process
    logger = logging.getLogger(SERVER_LOGGER)
    before = counter.count
    with caplog.at_level(logging.INFO, logger=SERVER_LOGGER):
        try:
            raise BadHttpMessage("Invalid character in chunk size:\n\n  b'zz'\n    ^")
        except BadHttpMessage as exc:
            logger.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
        try:
            raise RuntimeError("a real bug")
        except RuntimeError:
            logger.exception("Error handling request from %s", "127.0.0.1")
    malformed, bug = caplog.records
    assert malformed.levelno == logging.INFO and malformed.exc_info is None
    assert malformed.getMessage() == ("malformed request from 127.0.0.1: 400 Invalid character "
                                      "in chunk size: b'zz' ^")
    assert bug.levelno == logging.ERROR and bug.exc_info is not None  # still loud
    assert counter.count == before + 1
