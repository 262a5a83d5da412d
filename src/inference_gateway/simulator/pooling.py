"""What vLLM's pooling server (``--runner pooling --convert embed``) answers: embeddings,
``/v1/score`` and ``/v1/rerank``.

Vectors are deterministic toy embeddings of the prompt's token ids and scores their cosine, so
the same texts always score the same. Usage counts every text once: a ``1:N`` score counts the
query once and each document once. A pooling server words its 404 for an unknown model
without the list of aliases and without ``param``.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from typing import Any

from aiohttp import web

from inference_gateway.simulator import tokens, usage
from inference_gateway.simulator.engine import Engine, new_id
from inference_gateway.simulator.sampling import check_prompt, check_token_ids
from inference_gateway.simulator.validation import (
    Fields,
    SimError,
    checked,
    json_response,
)

ENCODINGS = ("float", "base64", "bytes", "bytes_only")
_EMPTY = "The decoder prompt cannot be empty"
# The alternative pairs of members a score request may name its two sides with, in the
# order vLLM's request model tries them.
SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
               ("text_1", "text_2"))


def embed(ids: list[int], dim: int) -> list[float]:
    """A unit vector that depends only on the token ids."""
    vector = [0.0] * dim
    for position, token in enumerate(ids):
        for j in range(dim):
            vector[j] += ((token * 2654435761 + (j + 1) * 40503 + position) % 1000) / 1000 - 0.5
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ids(engine: Engine, text: str) -> list[int]:
    ids = tokens.text_ids(text)
    if not ids:
        raise SimError(400, _EMPTY, "BadRequestError")
    check_prompt(len(ids), engine.config.max_model_len)
    return ids


def _inputs(engine: Engine, value: Any, truncate: int | None) -> list[list[int]]:
    """Token ids of each input of an embeddings request, cut to the last ``truncate``."""
    if not value and not isinstance(value, str):
        raise checked("You must pass at least one prompt")
    if isinstance(value, str):
        prompts = [tokens.text_ids(value)]
    elif all(isinstance(v, int) for v in value):
        prompts = [list(value)]
    else:
        prompts = [tokens.text_ids(v) if isinstance(v, str) else list(v) for v in value]
    if truncate is not None and truncate >= 0:
        prompts = [p[len(p) - truncate:] if truncate else [] for p in prompts]
    for prompt in prompts:
        if not prompt:
            raise SimError(400, _EMPTY, "BadRequestError")
        check_token_ids(prompt)
        check_prompt(len(prompt), engine.config.max_model_len)
    return prompts


def _read_input(fields: Fields) -> Any:
    if fields.body.get("input") is None:
        for name in ("input", "messages", "messages", "messages", "input", "messages", "input"):
            fields.add("missing", name, "Field required", fields.body)
        return None
    return fields.prompt("input", signed_nested=True)


async def embeddings(engine: Engine, request: web.Request) -> web.Response:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        encoding = body.get("encoding_format")
        if "encoding_format" in body and encoding not in ENCODINGS:
            expected = "'float', 'base64', 'bytes' or 'bytes_only'"
            fields.add("literal_error", "encoding_format", f"Input should be {expected}",
                       encoding, {"expected": expected})
        dimensions = fields.integer("dimensions")
        value = _read_input(fields)
        fields.string("model")
        truncate = fields.integer("truncate_prompt_tokens", ge=-1)
        fields.done()
        model = engine.pooling_model(body)
        if dimensions is not None:
            raise checked(f"Model '{model}' does not support Matryoshka embeddings; dimensions "
                          f"must be unset (received dimensions={dimensions}).")
        if truncate is not None and truncate > engine.config.max_model_len:
            raise checked("truncate_prompt_tokens value is greater than max_model_len. Please "
                          "request a smaller truncation size.")
        prompts = _inputs(engine, value, truncate)
    except SimError as exc:
        return exc.response()
    dim = engine.config.embedding_dim
    data: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        vector = embed(prompt, dim)
        shown: Any = vector
        if encoding not in (None, "float"):
            shown = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"index": i, "object": "embedding", "embedding": shown})
    prompt_tokens = sum(len(p) for p in prompts)
    engine.pooled(model, prompt_tokens)
    return json_response({"id": new_id("embd-"), "object": "list", "created": int(time.time()),
                          "model": model, "data": data, "usage": usage.pooling(prompt_tokens)})


MULTIMODAL = "MultiModalParam is not supported for LlamaForCausalLM"


def _multimodal(value: Any) -> bool:
    """Whether a score or rerank side holds multimodal items, which a text model refuses."""
    items = value if isinstance(value, list) else [value]
    return any(isinstance(item, dict) and isinstance(item.get("content"), list) for item in items)


def _side(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _score_sides(fields: Fields) -> tuple[list[str], list[str]] | None:
    """The two sides of a score request, under whichever pair of names it used."""
    body = fields.body
    for first, second in SCORE_PAIRS:
        if first not in body or second not in body:
            continue
        left, right = _side(body[first]), _side(body[second])
        multimodal = _multimodal(body[first]) or _multimodal(body[second])
        if (left is not None or _multimodal(body[first])) \
                and (right is not None or _multimodal(body[second])):
            return None if multimodal or left is None or right is None else (left, right)
    for first, second in SCORE_PAIRS:
        for name in (first, second):
            if name not in body:
                fields.add("missing", name, "Field required", body)
            elif _side(body[name]) is None and not _multimodal(body[name]):
                fields.add("string_type", name, "Input should be a valid string", body[name])
    return None


def _pairs(engine: Engine, left: list[str], right: list[str]) -> list[tuple[int, int]]:
    """Which text of each side each score compares: 1:1, 1:N or N:N."""
    if not left or not right:
        raise checked("At least one text_pair element must be given")
    if len(left) == 1:
        return [(0, j) for j in range(len(right))]
    if len(left) != len(right):
        raise checked("Input lengths must be either 1:1, 1:N or N:N")
    return [(i, i) for i in range(len(left))]


def _scores(engine: Engine, left: list[str], right: list[str]) -> tuple[list[float], int]:
    """The score of each pair, and the prompt tokens: every text counted once."""
    pairs = _pairs(engine, left, right)
    left_ids = [_ids(engine, t) for t in left]
    right_ids = [_ids(engine, t) for t in right]
    dim = engine.config.embedding_dim
    left_vectors = [embed(ids, dim) for ids in left_ids]
    right_vectors = [embed(ids, dim) for ids in right_ids]
    scores = [cosine(left_vectors[i], right_vectors[j]) for i, j in pairs]
    return scores, sum(map(len, left_ids)) + sum(map(len, right_ids))


async def score(engine: Engine, request: web.Request) -> web.Response:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        fields.string("model")
        sides = _score_sides(fields)
        fields.done()
        model = engine.pooling_model(body)
        if sides is None:
            raise checked(MULTIMODAL)
        scores, prompt_tokens = _scores(engine, *sides)
    except SimError as exc:
        return exc.response()
    engine.pooled(model, prompt_tokens)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return json_response({"id": new_id("score-"), "object": "list", "created": int(time.time()),
                          "model": model, "data": data,
                          "usage": usage.pooling(prompt_tokens)})


async def rerank(engine: Engine, request: web.Request) -> web.Response:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        fields.string("model")
        query = fields.string("query", required=True)
        if query is None and "query" in body:
            fields.add("dict_type", "query.ScoreMultiModalParam",
                       "Input should be a valid dictionary", body["query"])
        documents = _side(body.get("documents"))
        multimodal = _multimodal(body.get("documents"))
        if "documents" not in body:
            fields.add("missing", "documents", "Field required", body)
        elif documents is None and not multimodal:
            fields.add("string_type", "documents", "Input should be a valid string",
                       body["documents"])
        top_n = fields.integer("top_n", nullable=False, ge=0)
        fields.flag("return_documents")
        fields.done()
        model = engine.pooling_model(body)
        if multimodal or documents is None or query is None:
            raise checked(MULTIMODAL)
        scores, prompt_tokens = _scores(engine, [query], documents)
    except SimError as exc:
        return exc.response()
    engine.pooled(model, prompt_tokens)
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n:
        ranked = ranked[:top_n]
    results = [{"index": i, "document": {"text": documents[i], "multi_modal": None},
                "relevance_score": scores[i]} for i in ranked]
    return json_response({"id": new_id("score-"), "model": model,
                          "usage": {"prompt_tokens": prompt_tokens,
                                    "total_tokens": prompt_tokens},
                          "results": results})
