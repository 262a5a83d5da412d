"""The alert rules as Prometheus itself reads them: promtool checks them and runs their tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness import ROOT

RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                "(scripts/test.sh installs Debian's prometheus package)")


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_and_config_are_valid() -> None:
    assert "SUCCESS" in _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


def test_alerts_fire_when_they_should() -> None:
    """Among them: the spool alert fires for a growing backlog, not for a steady one, and
    metering drift does not for requests with n > 1."""
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")
