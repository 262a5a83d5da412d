"""vLLM's request checks and error bodies, worded as vLLM 0.32 words them.

Three layers answer a bad request, each in its own shape: Starlette when the body is not JSON it
can parse (``{"detail": ...}``), FastAPI's request validation when a member has the wrong type
(type ``Bad Request``, every problem listed), and vLLM's own checks (type ``BadRequestError``,
``(parameter=..., value=...)`` appended). A client gets the first layer that objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, TypeVar

import orjson
from aiohttp import web

UNSET: Any = object()
MAX_STOP_STRINGS = 4  # vLLM's VLLM_MAX_STOP_STRINGS
MAX_JSON_DEPTH = 969  # deeper bodies exhaust the recursion limit of vLLM's JSON parser
MAX_INT_DIGITS = 4300  # Python's limit on converting a string of digits to an int
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_REPORTED = 10  # vLLM lists at most this many validation errors ...
_MAX_INPUT_CHARS = 200  # ... shows this much of each offending value ...
_MAX_ERROR_CHARS = 1000  # ... and of each error
_INT_TEXT = re.compile(r"[+-]?\d+(?:_\d+)*(?:\.0*)?")
# pydantic's error for a value not of a type it takes only as it is
_NOT_EXACT: dict[type, tuple[str, str]] = {
    str: ("string_type", "Input should be a valid string"),
    list: ("list_type", "Input should be a valid list"),
    dict: ("dict_type", "Input should be a valid dictionary"),
}
T = TypeVar("T")


class SimError(Exception):
    """An error answer: OpenAI's shape, or Starlette's ``{"detail": ...}`` when ``detail``."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None,
                 *, detail: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param
        self.detail = detail

    def body(self) -> dict[str, Any]:
        if self.detail:
            return {"detail": self.message}
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}

    def response(self) -> web.Response:
        return json_response(self.body(), self.status)


def dump(obj: Any) -> bytes:
    """Compact JSON; text a client sent with lone surrogates is kept, escaped."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson refuses strings that are not valid UTF-8
        return json.dumps(obj, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dump(body), content_type="application/json")


def engine_failure() -> SimError:
    """vLLM's answer when its engine fails on an accepted request: a 500 with no message."""
    return SimError(500, "", "InternalServerError")


# How vLLM writes that failure into an OpenAI-shaped stream it has already started.
STREAM_FAILURE = (b'data: {"error": {"message": "", "type": "InternalServerError", '
                  b'"param": null, "code": 500}}\n\ndata: [DONE]\n\n')


def checked(message: str, param: str | None = None, value: object = None) -> SimError:
    """A failed check of vLLM's own; the parameter and value, when known, end the message."""
    extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
    return SimError(400, f"{message} ({', '.join(extras)})" if extras else message,
                    "BadRequestError", param)


def not_found_model(model: object, served: list[str]) -> SimError:
    return SimError(404, f"The model `{model}` does not exist. Valid aliases: "
                    f"{', '.join(served)}.", "NotFoundError", "model")


def summarise(value: object) -> str:
    """How vLLM shows an offending value: containers by size, the rest as bounded text."""
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, bytes):
        return f"<bytes of {len(value)} bytes>"
    try:
        text = str(value)
    except ValueError:  # an int past Python's digit limit
        return f"<{type(value).__name__}>"
    return text[:_MAX_INPUT_CHARS] + "...[truncated]" if len(text) > _MAX_INPUT_CHARS else text


def problem(kind: str, loc: str, msg: str, value: object,
            ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": summarise(value)}
    if ctx is not None:
        detail["ctx"] = ctx
    return detail


def invalid(problems: list[dict[str, Any]], param: str | None = UNSET) -> SimError:
    """FastAPI's request-validation answer listing ``problems`` (the first names the param)."""
    count = len(problems)
    label = "error" if count == 1 else "errors"
    lines = []
    for p in problems[:_MAX_REPORTED]:
        text = str(p)
        lines.append(text[:_MAX_ERROR_CHARS] + "...[truncated]" if len(text) > _MAX_ERROR_CHARS
                     else text)
    message = f"{count} validation {label}:\n" + "".join(f"  {line}\n" for line in lines)
    if count > _MAX_REPORTED:
        message += f"  ...and {count - _MAX_REPORTED} more {label}\n"
    first = problems[0]["loc"] if problems else None
    return SimError(400, message.rstrip(), "Bad Request", first if param is UNSET else param)


def parse_body(raw: bytes, content_type: str | None, check_content_type: bool) -> dict[str, Any]:
    """The JSON object of a request, refused where vLLM's web layer refuses it."""
    media = (content_type or "").lower().split(";", 1)[0].strip()
    if check_content_type and media != "application/json":
        raise SimError(400, "1 validation error:\n  Unsupported Media Type: Only "
                       "'application/json' is allowed", "Bad Request")
    if not raw:
        raise invalid([problem("missing", "body", "Field required", None)])
    try:
        body = json.loads(raw)  # not orjson: vLLM keeps big integers exact and reads NaN
    except json.JSONDecodeError as exc:
        raise invalid([problem("json_invalid", f"body.{exc.pos}", "JSON decode error", {},
                               {"error": exc.msg})]) from None
    except UnicodeDecodeError:
        raise invalid([problem("json_invalid", "body", "JSON decode error", {},
                               {"error": "Invalid JSON"})]) from None
    except (RecursionError, ValueError):  # too deep, or a number with too many digits
        raise parse_failure() from None
    if too_deep(raw, body):
        raise parse_failure()
    if not isinstance(body, dict):
        raise invalid([problem("model_attributes_type", "body",
                               "Input should be a valid dictionary or object to extract fields "
                               "from", body)])
    return body


def parse_failure() -> SimError:
    return SimError(400, "There was an error parsing the body", "Bad Request", detail=True)


def too_deep(raw: bytes, body: object) -> bool:
    """Whether ``body`` nests more than vLLM's parser can follow (counted without recursion)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    level: list[tuple[object, int]] = [(body, 1)]
    while level:
        node, depth = level.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children: Iterable[object] = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
        level.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return False


def not_token_ids(value: list[Any]) -> dict[str, Any]:
    """The first problem vLLM reports for a list that is not token ids: at its first element
    that is not a non-negative integer."""
    for i, item in enumerate(value):
        if not isinstance(item, int):
            if isinstance(item, str):
                return problem("int_parsing", f"{i}", "Input should be a valid integer, unable "
                               "to parse string as an integer", item)
            return problem("int_type", f"{i}", "Input should be a valid integer", item)
        if item < 0:
            return problem("greater_than_equal", f"{i}",
                           "Input should be greater than or equal to 0", item, {"ge": 0})
    return problem("int_type", "0", "Input should be a valid integer", value)


def _token_id(value: object, signed: bool = False) -> bool:
    return isinstance(value, int) and (signed or value >= 0)


class Fields:
    """Reads members of a request body with pydantic's lax conversions, gathering problems.

    Members are read in the order vLLM's request model declares them, so that the first
    problem, the one that names ``param``, is the one vLLM names.
    """

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.problems: list[dict[str, Any]] = []

    def done(self) -> None:
        if self.problems:
            raise invalid(self.problems)

    def add(self, kind: str, name: str, msg: str, value: object,
            ctx: dict[str, Any] | None = None) -> None:
        self.problems.append(problem(kind, f"body.{name}", msg, value, ctx))

    def add_under(self, name: str, found: dict[str, Any]) -> None:
        """A problem found inside member ``name`` (its ``loc`` relative to the member)."""
        self.problems.append({**found, "loc": f"body.{name}.{found['loc']}"})

    def present(self, name: str, required: bool, nullable: bool = True) -> bool:
        """Whether ``name`` has a value to convert; a missing required member is a problem,
        and so is a null where the model does not allow one (it is converted, and refused)."""
        if name not in self.body:
            if required:
                self.add("missing", name, "Field required", self.body)
            return False
        return required or not nullable or self.body[name] is not None

    def integer(self, name: str, *, required: bool = False, nullable: bool = True,
                ge: int | None = None, le: int | None = None) -> int | None:
        if not self.present(name, required, nullable):
            return None
        value = self.body[name]
        number = self._to_int(name, value)
        if number is None:
            return None
        if ge is not None and number < ge:
            self.add("greater_than_equal", name, f"Input should be greater than or equal to {ge}",
                     value, {"ge": ge})
            return None
        if le is not None and number > le:
            self.add("less_than_equal", name, f"Input should be less than or equal to {le}",
                     value, {"le": le})
            return None
        return number

    def _to_int(self, name: str, value: object) -> int | None:
        if isinstance(value, bool | int):
            return int(value)
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                self.add("finite_number", name, "Input should be a finite number", value)
            elif not value.is_integer():
                self.add("int_from_float", name, "Input should be a valid integer, got a number "
                         "with a fractional part", value)
            elif not INT64_MIN <= value <= INT64_MAX:
                self.add("int_parsing_size", name, "Unable to parse input string as an integer, "
                         "exceeded maximum size", value)
            else:
                return int(value)
            return None
        if isinstance(value, str):
            text = value.strip()
            if not _INT_TEXT.fullmatch(text):
                self.add("int_parsing", name, "Input should be a valid integer, unable to parse "
                         "string as an integer", value)
                return None
            digits = text.split(".", 1)[0]
            if len(digits) > MAX_INT_DIGITS:
                self.add("int_parsing_size", name, "Unable to parse input string as an integer, "
                         "exceeded maximum size", value)
                return None
            return int(digits)
        self.add("int_type", name, "Input should be a valid integer", value)
        return None

    def number(self, name: str) -> float | None:
        if not self.present(name, False):
            return None
        value = self.body[name]
        if isinstance(value, bool | int | float):
            try:
                return float(value)
            except OverflowError:
                return float("inf") if value > 0 else float("-inf")
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                self.add("float_parsing", name, "Input should be a valid number, unable to parse "
                         "string as a number", value)
                return None
        self.add("float_type", name, "Input should be a valid number", value)
        return None

    def flag(self, name: str, *, nullable: bool = True) -> bool | None:
        if not self.present(name, False, nullable):
            return None
        value = self.body[name]
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return value == 1
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("1", "on", "t", "true", "y", "yes"):
                return True
            if text in ("0", "off", "f", "false", "n", "no"):
                return False
        if isinstance(value, str | int | float):
            self.add("bool_parsing", name, "Input should be a valid boolean, unable to interpret "
                     "input", value)
        else:
            self.add("bool_type", name, "Input should be a valid boolean", value)
        return None

    def string(self, name: str, *, required: bool = False) -> str | None:
        return self._exact(name, str, required)

    def items(self, name: str, *, required: bool = False) -> list[Any] | None:
        return self._exact(name, list, required)

    def mapping(self, name: str) -> dict[str, Any] | None:
        return self._exact(name, dict, False)

    def _exact(self, name: str, kind: type[T], required: bool) -> T | None:
        """A member pydantic takes only as it is, without converting it."""
        if not self.present(name, required):
            return None
        value = self.body[name]
        if isinstance(value, kind):
            return value
        self._not_exact(kind, name, value)
        return None

    def _not_exact(self, kind: type, name: str, value: object) -> None:
        error, msg = _NOT_EXACT[kind]
        self.add(error, name, msg, value)

    def prompt(self, name: str, *, signed_nested: bool = False) -> Any:
        """``str | list[str] | list[int] | list[list[int]]``, as vLLM types a prompt and an
        embeddings input. Token ids may not be negative, but in a list of lists they may when
        ``signed_nested`` (vLLM checks those only against its vocabulary)."""
        value = self.body.get(name)
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            for kind in (list, list, str, list):  # each alternative, in the order pydantic tries
                self._not_exact(kind, name, value)
            return None
        if all(isinstance(v, str) for v in value) or all(_token_id(v) for v in value) \
                or all(isinstance(v, list) and all(_token_id(t, signed_nested) for t in v)
                       for v in value):
            return value
        self.add_under(name, not_token_ids(value))
        self._not_exact(str, name, value)
        return None

    def stop(self, name: str, *, text_allowed: bool = True) -> None:
        """Stop strings: a string (when ``text_allowed``) or at most four of them."""
        value = self.body.get(name)
        if value is None or (text_allowed and isinstance(value, str)):
            return
        if isinstance(value, list) and all(isinstance(v, str) for v in value) \
                and len(value) <= MAX_STOP_STRINGS:
            return
        if text_allowed:
            self._not_exact(str, name, value)
        if not isinstance(value, list):
            self._not_exact(list, name, value)
        elif len(value) > MAX_STOP_STRINGS:
            self.add("too_long", name, f"List should have at most {MAX_STOP_STRINGS} items "
                     f"after validation, not {len(value)}", value,
                     {"field_type": "List", "max_length": MAX_STOP_STRINGS,
                      "actual_length": len(value)})
        else:
            bad = next(i for i, v in enumerate(value) if not isinstance(v, str))
            self.add("string_type", f"{name}.{bad}", "Input should be a valid string", value[bad])
