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
_FRAME = 4  # tokens around each chat message (role markers), as a chat template adds
_GENERATION_PROMPT = 2  # tokens that open the assistant's turn


def count(text: str) -> int:
    return len(_TOKEN.findall(text))


def ids(text: str) -> list[int]:
    """Token ids of ``text``: stable numbers below ``VOCAB_SIZE``, one per token."""
    return [word_id(token) for token in _TOKEN.findall(text)]


def text_ids(text: str) -> list[int]:
    """Ids of a prompt: a non-empty text is at least one token, as with a real tokenizer."""
    found = ids(text)
    return found or ([word_id(text)] if text else [])


def word_id(word: str) -> int:
    return 4 + sum(word.encode("utf-8", "surrogatepass")) % (VOCAB_SIZE - 4)  # 0-3: special


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of each of its parts."""
    if isinstance(content, list):
        return " ".join(str(part.get("text") or "") for part in content
                        if isinstance(part, dict))
    return "" if content is None else str(content)


def chat_prompt_ids(messages: list[Any]) -> list[int]:
    """A chat prompt as the template would render it: each message framed, then the reply."""
    out: list[int] = []
    for message in messages:
        role, content = "user", None
        if isinstance(message, dict):
            role, content = str(message.get("role") or "user"), message.get("content")
        out += [1, word_id(role), 2, 3][:_FRAME]
        out += ids(content_text(content))
    return out + [1, word_id("assistant")][:_GENERATION_PROMPT]


def chat_prompt_tokens(messages: list[Any]) -> int:
    return len(chat_prompt_ids(messages))


def output_words(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic words; each is one token."""
    return [_WORDS[(seed + i) % len(_WORDS)] for i in range(n)]


def filler_ids(n: int, salt: int = 0) -> list[int]:
    """Stand-in prompt token ids, ``n`` of them (already checked against the context)."""
    return [4 + (salt * 31 + i * 7) % (VOCAB_SIZE - 4) for i in range(n)]
