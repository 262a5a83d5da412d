"""The checks vLLM's request models run on the raw body, before any member is validated.

They are pydantic ``model_validator(mode="before")`` functions, run last-defined first, so they
decide which error a request with several problems gets: a ``stream_options`` without
``stream`` is reported even when ``max_tokens`` is not a number. They look at raw values, by
truthiness, as vLLM's do.
"""

from __future__ import annotations

from typing import Any

from inference_gateway.simulator.validation import SimError, checked

MAX_COMPLETION_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS


def _not_iterable(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float)


def _stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") and not body.get("stream"):
        raise checked("Stream options can only be defined when `stream=True`.", "stream_options")


def _number(body: dict[str, Any], name: str) -> int | float | None:
    """A log-probability count, which must at least be a number to be compared."""
    value = body.get(name)
    if value is not None and not isinstance(value, int | float):
        raise checked(f"`{name}` must be an integer.", name, value)
    return value


def _prompt_logprobs(body: dict[str, Any]) -> None:
    value = body.get("prompt_logprobs")
    if value is None:
        return
    if body.get("stream") and (value > 0 or value == -1):
        raise checked("`prompt_logprobs` are not available when `stream=True`.",
                      "prompt_logprobs")
    if value < 0 and value != -1:
        raise checked("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs",
                      value)


def chat(body: dict[str, Any]) -> None:
    """``ChatCompletionRequest``'s checks, in the order vLLM runs them."""
    messages = body.get("messages", [])
    if _not_iterable(messages):  # vLLM loops over the messages before validating them
        raise SimError(400, f"'{type(messages).__name__}' object is not iterable",
                       "BadRequestError")
    if body.get("tools") == []:
        raise checked("`tools` must not be an empty array. Either provide at least one tool or "
                      "omit the field entirely.", "tools")
    _number(body, "prompt_logprobs")
    top = _number(body, "top_logprobs")
    _prompt_logprobs(body)
    if top is not None:
        if top < 0 and top != -1:
            raise checked("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
        if (top == -1 or top > 0) and not body.get("logprobs"):
            raise checked("when using `top_logprobs`, `logprobs` must be set to true.",
                          "top_logprobs")
    _stream_options(body)


def completion(body: dict[str, Any]) -> None:
    """``CompletionRequest``'s checks, in the order vLLM runs them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
            and len(prompt) > MAX_COMPLETION_PROMPTS:
        raise checked(f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
                      f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
                      "VLLM_MAX_COMPLETION_PROMPTS environment variable.", "prompt")
    if prompt is None or prompt == "":
        raise checked("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    _stream_options(body)
    _number(body, "prompt_logprobs")
    logprobs = _number(body, "logprobs")
    _prompt_logprobs(body)
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise checked("`logprobs` must be a positive value or -1.", "logprobs", logprobs)


def batch(body: dict[str, Any]) -> None:
    """``BatchChatCompletionRequest``'s own check: one completion per conversation."""
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise checked("Batch chat completions do not support `n > 1`. Please set `n` to 1.",
                      "n", n)


def conversation_members(body: dict[str, Any]) -> None:
    """Members a batch passes, unchecked, to each conversation's ``ChatCompletionRequest``.

    vLLM validates them only when it renders the conversations, after the model check, and
    reports a failure as pydantic's own text in a ``BadRequestError``.
    """
    chat({k: v for k, v in body.items() if k != "messages"})
    problems = []
    for name, kind in (("stream", "bool"), ("stream_options", "dict"),
                       ("ignore_eos", "bool"), ("min_tokens", "int")):
        value = body.get(name)
        if value is None or _fits(value, kind):
            continue
        problems.append(_python_problem(name, kind, value))
    if problems:
        count = len(problems)
        title = f"{count} validation error{'s' if count > 1 else ''} for ChatCompletionRequest"
        raise SimError(400, "\n".join([title, *problems]), "BadRequestError")


def _fits(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool) or value in (0, 1) or (
            isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0",
                                                          "on", "off", "t", "f", "y", "n"))
    if kind == "dict":
        return isinstance(value, dict)
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _python_problem(name: str, kind: str, value: object) -> str:
    """One error as ``str(pydantic.ValidationError)`` words it."""
    error, message = {
        "bool": ("bool_parsing" if isinstance(value, str) else "bool_type",
                 "Input should be a valid boolean"),
        "dict": ("dict_type", "Input should be a valid dictionary"),
        "int": ("int_parsing" if isinstance(value, str) else "int_type",
                "Input should be a valid integer"),
    }[kind]
    shown = repr(value)
    if len(shown) > 100:
        shown = shown[:49] + "..." + shown[-48:]
    return (f"{name}\n  {message} [type={error}, input_value={shown}, "
            f"input_type={type(value).__name__}]\n"
            f"    For further information visit https://errors.pydantic.dev/2.14/v/{error}")
