"""The sampling members of a generation request, checked in the order vLLM checks them.

Every number a client sends is bounded here before anything is built from it: ``n`` by
vLLM's ``VLLM_MAX_N_SEQUENCES``, output tokens by the context, so no loop or allocation of the
simulator grows with an unchecked client value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inference_gateway.simulator.cache import CacheUse
from inference_gateway.simulator.engine import Engine
from inference_gateway.simulator.load import Job
from inference_gateway.simulator.validation import INT64_MAX, INT64_MIN, Fields, checked

MAX_N = 16384  # vLLM's default VLLM_MAX_N_SEQUENCES
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
VOCAB_SIZE = 459  # as the tiny model the real-vLLM tests serve
ENGINE_INT_MAX = 2**64 - 1  # the largest integer vLLM's engine messages carry


@dataclass
class Sampling:
    """The sampling members of a request, their types already right."""

    n: int | None = None
    max_tokens: int | None = None
    max_tokens_key: str = "max_tokens"  # the member the client used, for vLLM's message
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logprobs: int | None = None  # how many log-probabilities per token were asked for

    @property
    def engine_refuses(self) -> bool:
        """Whether vLLM's engine fails on this request after accepting it: it cannot pass a
        ``top_k`` beyond 64 bits to its engine process, and answers 500 (the server lives on)."""
        return self.top_k is not None and self.top_k > ENGINE_INT_MAX

    def read_common(self, fields: Fields, *, engine_members: bool = True) -> None:
        """The members every generation endpoint shares; read after the endpoint's own.

        A batch request does not declare ``ignore_eos`` and ``min_tokens`` (``engine_members``
        false): they are checked later, with each conversation.
        """
        self.temperature = fields.number("temperature")
        self.top_p = fields.number("top_p")
        self.top_k = fields.integer("top_k")
        self.min_p = fields.number("min_p")
        self.repetition_penalty = fields.number("repetition_penalty")
        if engine_members:
            fields.flag("ignore_eos", nullable=False)
            self.min_tokens = fields.integer("min_tokens", nullable=False)


def read_seed(fields: Fields) -> None:
    fields.integer("seed", ge=INT64_MIN, le=INT64_MAX)


def check_max_tokens(sampling: Sampling, max_model_len: int) -> None:
    """The output budget asked for may not exceed the context (checked before the prompt)."""
    wanted = sampling.max_tokens
    if wanted is not None and wanted > max_model_len:
        key = sampling.max_tokens_key
        raise checked(f"{key}={wanted} cannot be greater than max_model_len={max_model_len}. "
                      "Please request fewer output tokens.", key, wanted)


def check_prompt(prompt_tokens: int, max_model_len: int) -> None:
    if prompt_tokens > max_model_len:
        # vLLM stops tokenizing one token past the limit, hence "at least".
        raise checked(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains at least {max_model_len + 1} input tokens, which exceeds this "
            "limit even without any output tokens. Please reduce the length of the input "
            "prompt.", "input_tokens", max_model_len + 1)


def check_token_ids(ids: list[int]) -> None:
    for token in ids:
        if not 0 <= token < VOCAB_SIZE:
            raise checked(f"Token id {token} is out of vocabulary")


def output_budget(sampling: Sampling, longest_prompt: int, max_model_len: int,
                  default_max_tokens: int) -> int:
    """Tokens to generate: what was asked for, or the default, but never past the context."""
    wanted = default_max_tokens if sampling.max_tokens is None else sampling.max_tokens
    return min(wanted, max_model_len - longest_prompt)


def verify(sampling: Sampling, max_tokens: int) -> int:
    """vLLM's ``SamplingParams`` checks, in its order; returns ``n``."""
    n = 1 if sampling.n is None else sampling.n
    if n < 1:
        raise checked(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise checked(f"n must be at most {MAX_N}, got {n}. To increase this limit, set the "
                      "VLLM_MAX_N_SEQUENCES environment variable.")
    for name, value in (("presence_penalty", sampling.presence_penalty),
                        ("frequency_penalty", sampling.frequency_penalty)):
        if value is not None and not -2.0 <= value <= 2.0:
            raise checked(f"{name} must be in [-2, 2], got {value}.")
    repetition = sampling.repetition_penalty
    if repetition is not None:
        if not math.isfinite(repetition):
            raise checked(f"repetition_penalty must be a finite number, got {repetition}.")
        if repetition <= 0.0:
            raise checked(f"repetition_penalty must be greater than zero, got {repetition}.")
    _verify_temperature(sampling.temperature)
    top_p = sampling.top_p
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise checked(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    if sampling.top_k is not None and sampling.top_k < -1:
        raise checked(f"top_k must be 0 (disable), or at least 1, got {sampling.top_k}.")
    min_p = sampling.min_p
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise checked(f"min_p must be in [0, 1], got {min_p}.")
    if max_tokens < 1:
        raise checked(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens",
                      max_tokens)
    min_tokens = sampling.min_tokens or 0
    if min_tokens < 0:
        raise checked(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > max_tokens:
        raise checked(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                      f"got {min_tokens}.")
    logprobs = sampling.logprobs
    if logprobs is not None and logprobs < -1:
        raise checked(f"logprobs must be non-negative or -1, got {logprobs}.", "logprobs",
                      logprobs)
    temperature = sampling.temperature
    if n > 1 and temperature is not None and temperature < 1e-5:
        raise checked(f"n must be 1 when using greedy sampling, got {n}.")
    if logprobs:
        asked = VOCAB_SIZE if logprobs == -1 else logprobs
        if asked > MAX_LOGPROBS:
            raise checked(f"Requested sample logprobs of {asked}, which is greater than max "
                          f"allowed: {MAX_LOGPROBS}", "logprobs", asked)
    return n


def _verify_temperature(value: float | None) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise checked(f"temperature must be a finite number, got {value}.", "temperature", value)
    if value < 0.0:
        raise checked(f"temperature must be non-negative, got {value}.", "temperature", value)
    if value > 2.0:
        raise checked(f"temperature must be in [0, 2], got {value}.", "temperature", value)


@dataclass
class Generation:
    """What one chat or completions request will generate, once every check has passed."""

    model: str
    prompts: list[int]  # prompt tokens of each prompt (one for chat)
    max_tokens: int
    n: int
    stream: bool = False
    include_usage: bool = False
    continuous: bool = False
    return_token_ids: bool = False
    # What each sequence found in the prefix cache, prompt by prompt and choice by choice: the
    # first choice of a new prompt computes it, the others find its full blocks, as on vLLM.
    cache: list[CacheUse] = field(default_factory=list)
    refused: bool = False  # the engine fails once the request is accepted (see Sampling)

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)

    @property
    def job(self) -> Job:
        return Job(self.prompts, self.n, self.max_tokens)

    @property
    def cached(self) -> int:
        return sum(use.cached for use in self.cache)


def plan(engine: Engine, body: dict[str, Any], sampling: Sampling,
         render: Callable[[], list[list[int]]], *, stream: bool,
         options: dict[str, Any] | None, return_token_ids: bool) -> Generation:
    """Run vLLM's checks after request validation, in its order, and plan the generation.

    ``render`` turns the request into prompts (token ids) and raises what rendering raises; the
    checks vLLM runs on the raw body (``prechecks``) have run before request validation.
    """
    model = engine.model(body)
    limit = engine.config.max_model_len
    check_max_tokens(sampling, limit)
    prompts = render()
    for prompt in prompts:
        check_prompt(len(prompt), limit)
        check_token_ids(prompt)
    max_tokens = output_budget(sampling, max(len(p) for p in prompts), limit,
                               engine.config.default_max_tokens)
    n = verify(sampling, max_tokens)
    options = options or {}
    include_usage = stream and options.get("include_usage") is True
    return Generation(
        model=model, prompts=[len(p) for p in prompts], max_tokens=max_tokens, n=n,
        stream=stream, include_usage=include_usage,
        continuous=include_usage and options.get("continuous_usage_stats") is True,
        return_token_ids=return_token_ids,
        cache=_lookups(engine, model, prompts, n),
        refused=sampling.engine_refuses,
    )


def _lookups(engine: Engine, model: str, prompts: list[list[int]], n: int) -> list[CacheUse]:
    """What each sequence finds in the prefix cache. After the first of a prompt, the others
    all find the same, so that is looked up once, however large ``n`` is."""
    uses: list[CacheUse] = []
    for prompt in prompts:
        uses.append(engine.cache_use(model, prompt))
        if n > 1:
            uses += [engine.cache_use(model, prompt)] * (n - 1)
    return uses
