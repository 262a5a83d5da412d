"""The ``usage`` objects of the OpenAI-shaped endpoints, with and without prompt details.

vLLM changes the members by place: a whole response lists every detail (null when off), a
stream's closing usage chunk carries only what is known (no ``multimodal_tokens``; completions
have no ``created_cache_tokens``), and running usage in chunks never carries prompt details.
"""

from __future__ import annotations

from typing import Any

from inference_gateway.simulator.cache import CacheUse


def whole(prompt: int, completion: int, cache: CacheUse | None, chat: bool) -> dict[str, Any]:
    """``usage`` of a whole response; ``cache`` only with --enable-prompt-tokens-details."""
    details: dict[str, Any] | None = None
    if cache is not None:
        details = {"cached_tokens": cache.cached,
                   "created_cache_tokens": cache.created if chat else None,
                   "multimodal_tokens": None}
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": details,
            "completion_tokens_details": None}


def final_chunk(prompt: int, completion: int, cache: CacheUse | None,
                chat: bool) -> dict[str, Any]:
    """``usage`` of the usage-only chunk that closes a stream with ``include_usage``."""
    usage: dict[str, Any] = running(prompt, completion)
    if cache is not None:
        usage["prompt_tokens_details"] = (
            {"cached_tokens": cache.cached, "created_cache_tokens": cache.created} if chat
            else {"cached_tokens": cache.cached})
    return usage


def running(prompt: int, completion: int) -> dict[str, Any]:
    """``usage`` of a completions chunk with ``continuous_usage_stats``."""
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion}


def running_chat(prompt: int, completion: int) -> dict[str, Any]:
    """``usage`` of a chat chunk with ``continuous_usage_stats``."""
    return {**running(prompt, completion), "completion_tokens_details": None}


def pooling(prompt: int) -> dict[str, Any]:
    """``usage`` of embeddings and scores: prompt tokens only."""
    return {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
            "prompt_tokens_details": None, "completion_tokens_details": None}
