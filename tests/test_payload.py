from __future__ import annotations

import json

import pytest

from inference_gateway.proxy.errors import GatewayError
from inference_gateway.proxy.payload import parse, upstream_body


def test_unchanged_body_is_forwarded_as_is() -> None:
    raw = b'{"model": "m",  "messages": []}'
    assert upstream_body(raw, parse(raw), "m") is raw


def test_alias_is_rewritten() -> None:
    raw = b'{"model": "alias", "prompt": "x"}'
    assert json.loads(upstream_body(raw, parse(raw), "m")) == {"model": "m", "prompt": "x"}


def test_stream_asks_for_usage_and_keeps_client_options() -> None:
    raw = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    payload = parse(raw)
    assert payload.client_usage and not payload.client_continuous_usage
    body = json.loads(upstream_body(raw, payload, "m"))
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_stream_options_without_stream_go_upstream_untouched() -> None:
    raw = b'{"model": "m", "stream_options": {"include_usage": true}}'
    assert upstream_body(raw, parse(raw), "m") is raw


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"{}", b'{"model": ""}', b'{"model": 1}'])
def test_bad_bodies(raw: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        parse(raw)
    assert err.value.status == 400
