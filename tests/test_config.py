from __future__ import annotations

import pytest

from inference_gateway.routing.router import Router
from inference_gateway.settings import ConfigError, load_settings


def test_original_variables_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SERVICE_PORT_MAP", "a=http://h:1/, b=https://h:2")
    monkeypatch.setenv("MODEL_REWRITES", "gpt-4:a")
    monkeypatch.setenv("ORG_AUTH_ENABLED", "true")
    settings = load_settings()
    assert settings.model_service_port_map == {"a": ("http://h:1",), "b": ("https://h:2",)}
    assert settings.model_rewrites == {"gpt-4": "a"}
    assert settings.webserver_port == 8080
    assert settings.org_auth_enabled is True
    assert settings.org_auth_cache_refresh_interval_sec == 10


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODEL_SERVICE_PORT_MAP", "no-equals-sign"),
        ("MODEL_SERVICE_PORT_MAP", "a=ftp://x"),
        ("MODEL_SERVICE_PORT_MAP", "a=http://x,a=http://y"),
        ("MODEL_SERVICE_PORT_MAP", "a=http://host:abc"),
        ("MODEL_SERVICE_PORT_MAP", "a=http://a:8000http://b:8000"),
        ("MODEL_SERVICE_PORT_MAP", "a=http://:8000"),
        ("MODEL_SERVICE_PORT_MAP", "a=http://h:70000"),
        ("FORWARDED_ENDPOINTS", " , "),
        ("MAX_N", "0"),
        ("MODEL_REWRITES", "alias:missing-target"),
        ("WEBSERVER_PORT", "99999"),
        ("WEBSERVER_WORKERS", "0"),
        ("ORG_AUTH_ENABLED", "perhaps"),
    ],
)
def test_malformed_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value)


def test_router_follows_rewrites() -> None:
    router = Router({"a": ("http://h:1",)}, {"alias": "a"})
    assert router.resolve("alias") == router.resolve("a")
    route = router.resolve("alias")
    assert route is not None and route.served_model == "a"
    assert router.resolve("b") is None
    assert router.model_ids() == ["a", "alias"]
