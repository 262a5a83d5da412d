from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference_gateway.proxy.endpoints import EndpointTable, dialect_of
from inference_gateway.settings import ConfigError, load_settings


def test_only_allow_listed_paths_match() -> None:
    table = EndpointTable()
    found = table.match("POST", "/v1/chat/completions")
    assert found is not None and found[0].shape == "openai" and found[1] is None
    for method, path in [("POST", "/v1/load_lora_adapter"), ("POST", "/v1/systemone"),
                         ("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completions/"),
                         ("POST", "/v1/../v1/chat/completions"), ("DELETE", "/v1/responses/x"),
                         ("POST", "/v1/responses/a/b"), ("GET", "/v1/responses/a b"),
                         ("GET", "/v1/responses/")]:
        assert table.match(method, path) is None, (method, path)


def test_response_ids_in_paths() -> None:
    table = EndpointTable()
    get = table.match("GET", "/v1/responses/resp_81140")
    cancel = table.match("POST", "/v1/responses/resp_81140/cancel")
    assert get is not None and get[1] == "resp_81140" and not get[0].bills
    assert cancel is not None and cancel[1] == "resp_81140" and cancel[0].routed_by == "response"


def test_operators_narrow_the_list() -> None:
    table = EndpointTable(("/v1/chat/completions",))
    assert table.match("POST", "/v1/chat/completions") is not None
    assert table.match("POST", "/v1/responses") is None
    assert table.match("GET", "/v1/responses/resp_1") is None


def test_forwarded_endpoints_setting() -> None:
    settings = load_settings(forwarded_endpoints=" /v1/completions, /v1/responses/{id} ")
    assert settings.forwarded_endpoints == ("/v1/completions", "/v1/responses/{id}")
    assert EndpointTable(settings.forwarded_endpoints).paths == settings.forwarded_endpoints
    wrong = load_settings(forwarded_endpoints="/v1/chat/completions,/v1/load_lora_adapter")
    with pytest.raises(ConfigError, match=r"FORWARDED_ENDPOINTS.*/v1/load_lora_adapter"):
        EndpointTable(wrong.forwarded_endpoints)


def test_serve_stops_on_an_endpoint_it_cannot_meter(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference_gateway", "serve"],
        env={**os.environ, "FORWARDED_ENDPOINTS": "/v1/load_lora_adapter",
             "SPOOL_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid FORWARDED_ENDPOINTS: /v1/load_lora_adapter" in result.stderr
    assert "Traceback" not in result.stderr


def test_messages_speak_anthropic() -> None:
    assert dialect_of("/v1/messages") == dialect_of("/v1/messages/count_tokens") == "anthropic"
    assert dialect_of("/v1/messagesx") == dialect_of("/v1/chat/completions") == "openai"


@pytest.mark.parametrize(("raw", "plain"), [
    ("/v1/chat/completions", True), ("/v1/responses/resp_1?stream=false", True),
    ("/v1/../../etc/passwd", False), ("/v1/chat/./completions", False),
    ("/v1/chat%2fcompletions", False), ("/v1/chat%2Fcompletions", False),
    ("/v1/%2e%2e/x", False), ("/v1\\chat", False), ("/v1/chat/completions/..", False),
    ("/v1/models?x=..", True), ("/v1/.well-known", True), ("./v1/chat", False),
])
def test_plain_paths(raw: str, plain: bool) -> None:
    from inference_gateway.proxy.endpoints import is_normal

    assert is_normal(raw) is plain


def test_framework_errors_are_put_in_the_dialect() -> None:
    import json

    from inference_gateway.errors import from_framework

    openai_shaped = from_framework(404, b'{"detail":"Not Found"}', "openai")
    assert openai_shaped is not None and json.loads(openai_shaped) == {"error": {
        "message": "Not Found", "type": "invalid_request_error", "param": None,
        "code": "model_server_error"}}
    anthropic_shaped = from_framework(400, b'{"detail":[{"loc":["body"]}]}', "anthropic")
    assert anthropic_shaped is not None and json.loads(anthropic_shaped) == {
        "type": "error", "error": {"type": "invalid_request_error",
                                   "message": '[{"loc":["body"]}]'}}
    vllm_own = b'{"error":{"message":"x","type":"BadRequestError","param":null,"code":400}}'
    assert from_framework(400, vllm_own, "openai") is None
