from __future__ import annotations

import json

import pytest

from inference_gateway.errors import GatewayError
from inference_gateway.proxy.endpoints import ENDPOINTS, Endpoint
from inference_gateway.proxy.payload import Caps, parse, upstream_body

BY_PATH = {e.path: e for e in ENDPOINTS}
CHAT = BY_PATH["/v1/chat/completions"]
RESPONSES = BY_PATH["/v1/responses"]
MESSAGES = BY_PATH["/v1/messages"]
BATCH = BY_PATH["/v1/chat/completions/batch"]


def test_unchanged_body_is_forwarded_as_is() -> None:
    raw = b'{"model": "m",  "messages": []}'
    assert upstream_body(raw, CHAT, parse(raw, CHAT), "m") is raw


def test_alias_is_rewritten() -> None:
    raw = b'{"model": "alias", "prompt": "x"}'
    body = upstream_body(raw, CHAT, parse(raw, CHAT), "m")
    assert json.loads(body) == {"model": "m", "prompt": "x"}


def test_stream_asks_for_usage_and_keeps_client_options() -> None:
    raw = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    payload = parse(raw, CHAT)
    assert payload.stream and payload.client_usage and not payload.client_continuous_usage
    body = json.loads(upstream_body(raw, CHAT, payload, "m"))
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_stream_options_without_stream_go_upstream_untouched() -> None:
    raw = b'{"model": "m", "stream_options": {"include_usage": true}}'
    assert upstream_body(raw, CHAT, parse(raw, CHAT), "m") is raw


@pytest.mark.parametrize("endpoint", [RESPONSES, MESSAGES])
def test_other_families_report_usage_unasked(endpoint: Endpoint) -> None:
    raw = b'{"model": "m", "stream": true}'
    payload = parse(raw, endpoint)
    assert payload.stream
    assert upstream_body(raw, endpoint, payload, "m") is raw


def test_a_stream_flag_where_vllm_would_undercount() -> None:
    with pytest.raises(GatewayError) as err:
        parse(b'{"model": "m", "stream": true}', BATCH)
    assert (err.value.status, err.value.param) == (400, "stream")
    assert not parse(b'{"model": "m", "stream": false}', BATCH).stream


@pytest.mark.parametrize("top_k", [2**64, 2**70, -2, "99999999999"])
def test_a_top_k_that_would_crash_the_engine(top_k: object) -> None:
    with pytest.raises(GatewayError) as err:
        parse(json.dumps({"model": "m", "top_k": top_k}).encode(), CHAT)
    assert (err.value.status, err.value.param) == (400, "top_k")
    parse(b'{"model": "m", "top_k": -1}', CHAT)
    parse(b'{"model": "m", "top_k": 50}', CHAT)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"{}", b'{"model": ""}', b'{"model": 1}',
                                 b'{"model": "m", "stream": "true"}',
                                 b'{"model": "m", "stream": 1}'])
def test_bad_bodies(raw: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        parse(raw, CHAT)
    assert err.value.status == 400


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "m", "n": 1180591620717411303424}', "n"),
    (b'{"model": "m", "n": "9"}', "n"),
    (b'{"model": "m", "max_tokens": 101}', "max_tokens"),
    (b'{"model": "m", "max_completion_tokens": 101.0}', "max_completion_tokens"),
    (b'{"model": "m", "max_output_tokens": 1e30}', "max_output_tokens"),
])
def test_caps(raw: bytes, param: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse(raw, CHAT, Caps(max_n=8, max_tokens=100))
    assert (err.value.status, err.value.param) == (400, param)
    parse(b'{"model": "m", "n": 8, "max_tokens": 100}', CHAT, Caps(max_n=8, max_tokens=100))
    parse(raw, CHAT, Caps())  # no ceiling: vLLM's own checks apply


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "m", "input": "x", "background": true}', "background"),
    (b'{"model": "m", "input": "x", "request_id": "resp_1"}', "request_id"),
    (b'{"model": "m", "input": "x", "previous_response_id": 5}', "previous_response_id"),
])
def test_responses_refuses_what_escapes_metering_or_tenancy(raw: bytes, param: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse(raw, RESPONSES)
    assert (err.value.status, err.value.param) == (400, param)


def test_previous_response_id_is_read() -> None:
    raw = b'{"model": "m", "input": "x", "previous_response_id": "resp_1", "background": false}'
    assert parse(raw, RESPONSES).previous_response_id == "resp_1"
