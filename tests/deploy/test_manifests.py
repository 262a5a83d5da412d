"""The deployment files: the Dockerfiles pass hadolint, the Kubernetes objects validate against the
Kubernetes API schemas, and they agree with the code (settings, shutdown times, user, lock)."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from inference_gateway.metering.meter import Meter
from inference_gateway.server import SHUTDOWN_TIMEOUT_SEC
from inference_gateway.settings import Settings

from harness import ROOT

BIN = Path(sys.executable).parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "postgres" / "Dockerfile",
               ROOT / "deploy" / "vllm" / "Dockerfile"]
# The oldest Kubernetes the manifests are meant for, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
SETTINGS = {name.upper() for name in Settings.model_fields}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120,
                          check=False)


def manifests() -> list[Path]:
    """What `kubectl apply -f deploy/kubernetes/` applies, and the example Secret."""
    return [*sorted(KUBERNETES.glob("*.yaml")), KUBERNETES / "examples" / "secret.yaml"]


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_dockerfiles_pass_hadolint() -> None:
    for dockerfile in DOCKERFILES:
        done = run(str(BIN / "hadolint"), str(dockerfile))
        assert done.returncode == 0, f"{dockerfile.relative_to(ROOT)}:\n{done.stdout}{done.stderr}"
    # The linter is really looking: an unpinned base and a root user are reported.
    bad = run(str(BIN / "hadolint"), "-", stdin="FROM debian\nRUN apt-get install -y curl\n")
    assert bad.returncode != 0 and "DL3006" in bad.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_validate(version: str, tmp_path: Path) -> None:
    files = [str(p) for p in manifests()]
    done = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, *files)
    assert done.returncode == 0, done.stdout + done.stderr
    # A misspelt field is refused: the validation is strict.
    gateway = (KUBERNETES / "30-gateway.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(gateway.replace("terminationGracePeriodSeconds", "terminationGraceSeconds"))
    done = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version,
               str(broken))
    assert done.returncode != 0


def test_gateway_statefulset_keeps_spools_and_drains_before_it_stops() -> None:
    found = objects()
    config = found[("ConfigMap", "inference-gateway")]["data"]
    sts = found[("StatefulSet", "inference-gateway")]["spec"]
    pod = sts["template"]["spec"]
    (gateway,) = pod["containers"]

    # The spool is on the pod's own claim, where SPOOL_DIR says.
    (claim,) = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config["SPOOL_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/lively"

    # The grace period covers the preStop pause and the gateway's own stop: in-flight requests,
    # then the spool's drain (Meter.close), then closing the writer.
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = inspect.signature(Meter.close).parameters["within"].default
    needed = float(pre_stop[1]) + SHUTDOWN_TIMEOUT_SEC + drain + 2
    assert pod["terminationGracePeriodSeconds"] > needed

    # The image's user; the volume made writable for it.
    image_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert image_user is not None
    security = pod["securityContext"]
    assert (str(security["runAsUser"]), str(security["fsGroup"])) == image_user.groups()
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True

    # Workers match the CPU limit (the gateway cannot see the limit; it would count the node's).
    assert config["WEBSERVER_WORKERS"] == str(gateway["resources"]["limits"]["cpu"])

    budget = found[("PodDisruptionBudget", "inference-gateway")]["spec"]
    labels = sts["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    hpa = found[("HorizontalPodAutoscaler", "inference-gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                     "name": "inference-gateway"}


def test_migrations_run_in_a_job_and_config_is_split() -> None:
    found = objects()
    config = found[("ConfigMap", "inference-gateway")]["data"]
    secret = found[("Secret", "inference-gateway")]["stringData"]
    job = found[("Job", "inference-gateway-migrate")]["spec"]
    sts = found[("StatefulSet", "inference-gateway")]["spec"]

    (migrate,) = job["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert 0 < job["backoffLimit"] <= 5
    assert migrate["image"] == sts["template"]["spec"]["containers"][0]["image"]
    assert config["MIGRATE_ON_START"] == "false"

    assert set(secret) >= {"DATABASE_URL"}
    assert "DATABASE_URL" not in config
    unknown = (set(config) | set(secret)) - SETTINGS
    assert not unknown, f"not settings of the gateway: {unknown}"


def test_prepared_service_monitor_targets_the_pods() -> None:
    monitor = yaml.safe_load((KUBERNETES / "prepared" / "servicemonitor.yaml").read_text())
    pods = objects()[("Service", "inference-gateway-pods")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in pods["spec"]["ports"]}


def test_compose_runs_the_same_stack() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "vllm", "migrate", "redis", "gateway", "prometheus"}
    assert "shared_preload_libraries=pg_cron" in services["postgres"]["command"]
    gateway = services["gateway"]
    assert set(gateway["environment"]) <= SETTINGS
    assert gateway["environment"]["MIGRATE_ON_START"] == "false"
    assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate"]
    assert gateway["volumes"][0].endswith(":/var/lib/inference-gateway/spool")
    model, _, url = gateway["environment"]["MODEL_SERVICE_PORT_MAP"].partition("=")
    assert url == "http://vllm:8000"
    assert f'"--served-model-name", "{model}"' in (
        ROOT / "deploy" / "vllm" / "Dockerfile").read_text()

    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    assert {"vllm:8000", "gateway:8080"} <= targets
    assert prometheus["rule_files"] == ["alerts.yml"]
    assert any(v.endswith(":/etc/prometheus/alerts.yml:ro")
               for v in services["prometheus"]["volumes"])


def test_requirements_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines()
             if ln and not ln.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[\w.+-]+", version), f"not an exact pin: {line}"
        pins[canonicalize_name(name)] = version
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["pgmq"]]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is missing: run deploy/image/lock.py"
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} does not satisfy {req}: run deploy/image/lock.py")


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_configuration_is_valid() -> None:
    env = {**os.environ, "LISTEN": "127.0.0.1:8080", "GATEWAY_1": "127.0.0.1:8081",
           "GATEWAY_2": "127.0.0.1:8082"}
    done = subprocess.run(["haproxy", "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                          env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
