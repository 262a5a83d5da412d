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
    assert usage == {"prompt_tokens": 1, "completion_tokens": 2}


def test_record_round_trips_through_json() -> None:
    record = UsageRecord("6f1c1c5e-2b0a-4c59-9d8e-0f6e2f3d7a10", "o", "i", "m", "alias",
                         "/v1/completions", 1, 2, 200, True, False, 12, 3, 1.5, 2.5)
    assert UsageRecord.from_json(record.to_json()) == record


def test_braces_and_quotes_inside_usage_strings() -> None:
    for body in (b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"note":"a}b"}}',
                 b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"note":"a\\"}"}}',
                 b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"d":{"x":1}}}'):
        assert read_usage(body) == Usage(1, 2), body


def test_cached_tokens_of_each_shape() -> None:
    chat = (b'{"id":"chatcmpl-1","usage":{"prompt_tokens":358,"total_tokens":360,'
            b'"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":256,'
            b'"created_cache_tokens":0,"multimodal_tokens":null},"completion_tokens_details":null}}')
    assert read_usage(chat) == Usage(358, 2, 256)
    responses = (b'{"id":"resp_1","output":[],"usage":{"input_tokens":358,"input_tokens_details":'
                 b'{"cached_tokens":256,"cache_write_tokens":0,"input_tokens_per_turn":[],'
                 b'"cached_tokens_per_turn":[]},"output_tokens":2,"output_tokens_details":'
                 b'{"reasoning_tokens":0},"total_tokens":360},"user":null}')
    assert read_usage(responses, "responses") == Usage(358, 2, 256)
    # Anthropic's input_tokens leaves out what was read from or written to the cache.
    messages = (b'{"id":"chatcmpl-2","type":"message","content":[{"type":"tool_use","input":'
                b'{"usage":{"input_tokens":1}}}],"usage":{"input_tokens":102,"output_tokens":2,'
                b'"cache_creation_input_tokens":10,"cache_read_input_tokens":246}}')
    assert read_usage(messages, "anthropic") == Usage(358, 2, 246)
    assert read_usage(b'{"usage":{"input_tokens":21,"output_tokens":0}}', "anthropic") == \
        Usage(21, 0, 0)


def test_shapes_reject_what_is_not_a_count() -> None:
    assert read_usage(b'{"usage":{"input_tokens":true,"output_tokens":1}}', "responses") is None
    assert read_usage(b'{"usage":{"input_tokens":1}}', "anthropic") is None
    assert read_usage(b'{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":9}'
                      b'}}') == Usage(5, 0, 5)  # never more cached than prompt
    assert read_usage(b'{"usage":{"prompt_tokens":-3,"completion_tokens":2,'
                      b'"prompt_tokens_details":{"cached_tokens":true}}}') == Usage(0, 2, 0)
    assert read_usage(b'{"usage":{"prompt_tokens":4,"completion_tokens":null}}') == Usage(4, 0)
    assert read_usage(b'{"usage":{"input_tokens":4,"output_tokens":null}}', "responses") is None


def test_the_answers_own_id() -> None:
    from inference_gateway.metering.readers import read_id

    assert read_id(b'{"id":"resp_8114086afb67dd88","created_at":1}') == "resp_8114086afb67dd88"
    assert read_id(b'{"object":"list","data":[{"id":"x"}]}') is None
    assert read_id(b'{"id":"a\\"b"}') is None
    assert read_id(b"") is None and read_id(b'{"id":"unterminated') is None


def test_a_deeply_nested_usage_object_is_found() -> None:
    details = b'{"a":' * 50 + b"1" + b"}" * 50
    body = b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"x":' + details + b'}}'
    assert read_usage(body) == Usage(1, 2)
