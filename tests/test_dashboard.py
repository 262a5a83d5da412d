"""The dashboard in a real browser (Debian's chromium, headless, driven by Selenium) over a
seeded database: sign in, the totals and the chart, another grouping, the CSV, the operator's
view, and the page's security headers."""

from __future__ import annotations

import asyncio
import csv
import re
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from inference_gateway.portal import rollups
from inference_gateway.tenants.keys import create_key

from harness import Proc, start_gateway
from usage_support import ADMIN_TOKEN, Row, drop_database, fresh_database, insert

DAY = 86400
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,1500")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")


@dataclass
class Site:
    gateway: Proc
    rows: list[Row]
    key: str  # acme/a1's


def seed(now: int, key_a1: int, key_a2: int) -> list[Row]:
    """A week of usage: acme/a1 by key and by headers, acme/a2, and bravo."""
    today = now - now % DAY
    rows = [Row("acme", "a1", "m1", "/v1/chat/completions", today - k * DAY + 3600,
                1000 * k, 100 * k, 10 * k, key_a1) for k in range(1, 7)]
    rows += [Row("acme", "a1", "m2", "/v1/responses", today - k * DAY + 7200, 500, 50)
             for k in (2, 4)]
    rows += [Row("acme", "a1", "emb", "/v1/embeddings", today - 3 * DAY, 777),
             Row("acme", "a2", "m1", "/v1/chat/completions", today - DAY + 60, 9999, 999, 0,
                 key_a2)]
    rows += [Row("bravo", "b1", "m3", "/v1/chat/completions", today - k * DAY + 600, 20000, 2000)
             for k in (1, 2, 3)]
    return rows


async def _prepare(url: str) -> tuple[list[Row], str]:
    conn = await asyncpg.connect(url)
    try:
        key, _ = await create_key(conn, "acme", "a1")
        other, _ = await create_key(conn, "acme", "a2")
        ids = [await conn.fetchval("SELECT id FROM inference.api_keys WHERE prefix = $1", k[:12])
               for k in (key, other)]
        rows = seed(int(time.time()), *ids)
        await insert(conn, rows)
        await rollups.catch_up(conn, timedelta(0))
        return rows, key
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def site(admin_url: str, session_tmp: Path, simulator: Proc) -> Iterator[Site]:
    name = f"gateway_dashboard_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(fresh_database(admin_url, name))
    try:
        rows, key = asyncio.run(_prepare(url))
        gateway = start_gateway(session_tmp, url, simulator.url, ADMIN_TOKEN=ADMIN_TOKEN,
                                RUN_USAGE_ROLLUPS="false", MODEL_PRICES="m1=2:8")
        try:
            yield Site(gateway, rows, key)
        finally:
            gateway.stop()
    finally:
        asyncio.run(drop_database(admin_url, name))


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(tmp_path: Path, downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, check: object, what: str, timeout: float = 15) -> None:
    try:
        # The page redraws as it goes: an element read a moment ago may be gone.
        WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)
                      ).until(lambda d: check())  # type: ignore[operator]
    except WebDriverException as exc:
        raise AssertionError(f"{what}: not so after {timeout} s "
                             f"({driver.find_element(By.ID, 'error').text!r})") from exc


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def legend(driver: WebDriver) -> list[str]:
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#legend li")]


def bars(driver: WebDriver, chart: str) -> dict[str, int]:
    """The chart's bars, summed by series."""
    out: dict[str, int] = {}
    for rect in driver.find_elements(By.CSS_SELECTOR, f"#{chart} rect[data-series]"):
        series = rect.get_attribute("data-series") or ""
        out[series] = out.get(series, 0) + int(rect.get_attribute("data-value") or 0)
    return out


def totals(rows: list[Row], **where: str) -> dict[str, int]:
    picked = [r for r in rows if r.family == "completions"
              and all(getattr(r, k) == v for k, v in where.items())]
    return {"input": sum(r.prompt for r in picked), "output": sum(r.completion for r in picked),
            "cached": sum(r.cached for r in picked), "requests": len(picked)}


def shown_totals(driver: WebDriver) -> dict[str, int]:
    return {name: int(text(driver, f"total-{name}").replace(",", ""))
            for name in ("input", "output", "cached", "requests")}


def sign_in(driver: WebDriver, site: Site, token: str) -> None:
    driver.get(f"{site.gateway.url}/dashboard")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()
    wait(driver, lambda: re.fullmatch(r"[0-9,]+", text(driver, "total-requests")),
         "totals shown")


def downloaded(downloads: Path) -> bool:
    """Whether a download has finished: the browser first puts an empty file under the final
    name, writes beside it (``.crdownload``) and only then moves the written file over it."""
    files = list(downloads.iterdir())
    return bool(files) and not any(f.suffix == ".crdownload" for f in files) \
        and all(f.stat().st_size > 0 for f in files)


def screenshot(driver: WebDriver, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    driver.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\ndashboard screenshot: {path}")


def test_a_tenant_sees_its_usage_and_downloads_it(
        site: Site, browser: WebDriver, downloads: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    sign_in(browser, site, site.key)
    want = totals(site.rows, org="acme", instance="a1")
    assert shown_totals(browser) == want
    assert "acme / a1" in text(browser, "who")
    # The chart by model: the bars add up to the tokens of each model.
    by_model: dict[str, int] = {}
    for r in site.rows:
        if r.family == "completions" and (r.org, r.instance) == ("acme", "a1"):
            by_model[r.model] = by_model.get(r.model, 0) + r.prompt + r.completion
    assert bars(browser, "tokens-chart") == by_model
    assert sum(bars(browser, "requests-chart").values()) == want["requests"]
    assert legend(browser) == sorted(by_model, key=lambda m: -by_model[m])
    cost = (want["input"] * 2 + want["output"] * 8) / 1e6  # MODEL_PRICES m1=2:8
    assert text(browser, "total-cost") == f"{cost:.2f} USD"
    # The key is in the tab's session storage, never in the address.
    assert site.key not in browser.current_url
    assert browser.execute_script(
        "return sessionStorage.getItem('inference-gateway.usage-token')") == site.key
    screenshot(browser, tmp_path / "dashboard-tenant.png", capsys)

    Select(browser.find_element(By.ID, "group")).select_by_value("api_key_id")
    wait(browser, lambda: legend(browser) == [site.key[:12], "(none)"], "grouped by key")
    Select(browser.find_element(By.ID, "group")).select_by_value("instance_id")
    wait(browser, lambda: legend(browser) == ["a1"], "grouped by instance")
    assert bars(browser, "tokens-chart") == {"a1": want["input"] + want["output"]}

    browser.find_element(By.ID, "csv").click()
    wait(browser, lambda: downloaded(downloads), "the CSV downloaded")
    [path] = downloads.glob("*.csv")
    assert path.name == "usage-completions-by-instance_id.csv"
    lines = list(csv.DictReader(path.read_text().splitlines()))
    assert {line["instance_id"] for line in lines} == {"a1"}
    assert sum(int(line["input_tokens"]) for line in lines) == want["input"]
    assert sum(int(line["num_model_requests"]) for line in lines) == want["requests"]
    assert not [entry for entry in browser.get_log("browser")
                if "Content Security Policy" in entry["message"]]


def test_an_operator_sees_every_organization(site: Site, browser: WebDriver, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sign_in(browser, site, ADMIN_TOKEN)
    assert shown_totals(browser) == totals(site.rows)
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#top-rows tr"), "top orgs")
    top = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
           for row in browser.find_elements(By.CSS_SELECTOR, "#top-rows tr")]
    assert [row[0] for row in top] == ["bravo", "acme"]
    Select(browser.find_element(By.ID, "group")).select_by_value("organization_id")
    wait(browser, lambda: legend(browser) == ["bravo", "acme"], "grouped by organization")
    screenshot(browser, tmp_path / "dashboard-operator.png", capsys)
    # Choosing an organization shows its usage alone.
    browser.find_elements(By.CSS_SELECTOR, "#top-rows tr")[1].click()
    wait(browser, lambda: shown_totals(browser) == totals(site.rows, org="acme"), "acme alone")
    assert legend(browser) == ["acme"]


def test_a_wrong_key_is_refused_and_the_page_allows_no_inline_code(
        site: Site, browser: WebDriver) -> None:
    browser.get(f"{site.gateway.url}/dashboard")
    field = browser.find_element(By.ID, "token")
    field.send_keys("igw_" + "n" * 43)
    field.submit()
    wait(browser, lambda: "Incorrect API key" in text(browser, "signin-error"), "refused")
    assert browser.find_element(By.ID, "usage").is_displayed() is False
    assert "igw_" not in browser.current_url
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        with urllib.request.urlopen(f"{site.gateway.url}{path}", timeout=10) as resp:
            policy = resp.headers["Content-Security-Policy"]
            body = resp.read().decode()
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "form-action 'none'" in policy and "frame-ancestors 'none'" in policy
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        if path == "/dashboard":
            assert "<script>" not in body and "style=" not in body
            assert not re.search(r"\son[a-z]+\s*=", body)  # no inline event handlers
