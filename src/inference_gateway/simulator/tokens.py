"""A deterministic toy tokenizer: one token per word or punctuation mark."""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORDS = (
    "the", "city", "by", "the", "bay", "is", "known", "for", "its", "fog", "its", "hills",
    "its", "bridges", "and", "its", "food", "people", "come", "from", "far", "away", "to",
    "walk", "along", "the", "water", "and", "ride", "the", "old", "cable", "cars",
)
VOCAB_SIZE = 459  # as the tiny model the real-vLLM tests serve


def count(text: str) -> int:
    return len(_TOKEN.findall(text))


def ids(text: str) -> list[int]:
    """Token ids of ``text``: stable numbers below ``VOCAB_SIZE``, one per token."""
    return [word_id(token) for token in _TOKEN.findall(text)]


def word_id(word: str) -> int:
    return 4 + sum(word.encode()) % (VOCAB_SIZE - 4)  # 0-3 are the special tokens


def chat_prompt_tokens(messages: list[Any]) -> int:
    """Tokens of a chat prompt: each message's content plus a fixed frame per message."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = " ".join(
                part.get("text", "") for part in content if isinstance(part, dict)
            )
        total += 4 + count(str(content or ""))
    return total + 2


def output_words(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic words; each is one token."""
    return [_WORDS[(seed + i) % len(_WORDS)] for i in range(n)]
