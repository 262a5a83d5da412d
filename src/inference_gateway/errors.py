"""The error bodies a client can get from the gateway itself, in the dialect of its endpoint.

OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, everywhere; Anthropic's,
``{"type": "error", "error": {"type", "message"}}``, on the Messages API, whose SDK reads that.
"""

from __future__ import annotations

from typing import Literal

import orjson
from aiohttp import web

Dialect = Literal["openai", "anthropic"]

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    dialect: Dialect = "openai",
    error_type: str | None = None,
) -> bytes:
    """Serialise an error as OpenAI's API does, or as Anthropic's does.

    ``error_type`` overrides OpenAI's ``type`` where OpenAI itself uses a particular one (its
    429s say ``requests``, ``tokens`` or ``insufficient_quota``).
    """
    if dialect == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500
                                    else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    error = {
        "message": message,
        "type": error_type or _OPENAI_TYPES.get(status, "api_error" if status >= 500
                                                else "invalid_request_error"),
        "param": param,
        "code": code,
    }
    return orjson.dumps({"error": error})


def from_framework(status: int, body: bytes, dialect: Dialect) -> bytes | None:
    """An error the model server's web framework wrote (``{"detail": ...}``: an unknown path, a
    body it could not parse) in the dialect's shape; None for any other body.

    vLLM's own errors are already in the OpenAI shape and pass unchanged; these would reach a
    client that cannot read them.
    """
    if not body.startswith(b'{"detail"'):
        return None
    try:
        detail = orjson.loads(body).get("detail")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return error_body(status, message, code="model_server_error", dialect=dialect)


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    dialect: Dialect = "openai",
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message, param=param, code=code, dialect=dialect),
        content_type="application/json",
        headers=headers,
    )


class GatewayError(Exception):
    """An error raised on the request path that maps straight onto one client response."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        error_type: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}

    def response(self, headers: dict[str, str] | None = None,
                 dialect: Dialect = "openai") -> web.Response:
        return web.Response(
            status=self.status, content_type="application/json",
            headers={**(headers or {}), **self.headers},
            body=error_body(self.status, self.message, param=self.param, code=self.code,
                            dialect=dialect, error_type=self.error_type))
