from __future__ import annotations

import json

from inference_gateway.metering.readers import Usage, read_usage, usage_span
from inference_gateway.metering.record import UsageRecord


def test_reads_usage_at_the_end() -> None:
    body = (b'{"id":"x","choices":[{"message":{"content":"the \\"usage\\": {1}"}}],'
            b'"usage":{"prompt_tokens":23,"total_tokens":43,"completion_tokens":20,'
            b'"prompt_tokens_details":null},"kv_transfer_params":null}')
    assert read_usage(body) == Usage(23, 20)


def test_usage_inside_a_string_is_not_a_key() -> None:
    body = json.dumps({"choices": [{"text": '"usage": {"prompt_tokens": 999}'}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert read_usage(body) == Usage(3, 4)
    body = json.dumps({"choices": [{"text": '"usage": {"prompt_tokens": 999}'}]}).encode()
    assert read_usage(body) is None


def test_embeddings_usage_without_completion_tokens() -> None:
    assert read_usage(b'{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}') == Usage(5, 0)


def test_null_and_malformed_usage() -> None:
    assert read_usage(b'{"usage":null}') is None
    assert read_usage(b'{"usage":{"prompt_tokens":"5"}}') is None
    assert read_usage(b'{"usage":{"prompt_tokens":5') is None
    assert read_usage(b"not json at all") is None


def test_span_covers_exactly_the_member() -> None:
    data = b'{"a":1, "usage" : {"prompt_tokens":1,"completion_tokens":2} ,"b":2}'
    span = usage_span(data)
    assert span is not None
    start, end, usage = span
    assert data[start:end] == b'"usage" : {"prompt_tokens":1,"completion_tokens":2}'
    assert usage == Usage(1, 2)


def test_record_round_trips_through_json() -> None:
    record = UsageRecord("6f1c1c5e-2b0a-4c59-9d8e-0f6e2f3d7a10", "o", "i", "m", "alias",
                         "/v1/completions", 1, 2, 200, True, False, 12, 3, 1.5, 2.5)
    assert UsageRecord.from_json(record.to_json()) == record


def test_braces_and_quotes_inside_usage_strings() -> None:
    for body in (b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"note":"a}b"}}',
                 b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"note":"a\\"}"}}',
                 b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"d":{"x":1}}}'):
        assert read_usage(body) == Usage(1, 2), body
