"""The dashboard in real headless Chromium, fed by a real local fleet: ``windfleet demo --serve``
(Mosquitto, device runtimes running the four components, the dashboard process ingesting their
telemetry).  The operator sees the gateways and their model versions, a turbine's feature errors
against thresholds, the injected anomalies, and approves a new version from the registry page;
the fleet rolls it out.  Ctrl-C then closes the books and stops every process."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request

import pytest

from tests.mqtt_fixtures import wait_until
from tests.test_dashboard import browser, page, shot  # noqa: F401 - fixtures
from tests.demo_fixtures import GATEWAYS, TURBINES, leftovers, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.browser]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def served_fleet(demo_model, tmp_path):
    work = tmp_path / "work"
    proc = run_demo(work, demo_model, "--serve", "--no-drift")  # the drift stages: test_demo.py
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_until(lambda: any("Serving the fleet" in line for line in lines) or proc.poll() is not None,
                   420, 1.0, "the demo serves")
        out = "".join(lines)
        assert proc.poll() is None, out[-3000:]
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/", out).group(1)
        token = re.search(r"approve/reject token: (\S+)\)", out).group(1)
        yield {"url": url, "token": token, "work": work, "home": work / "home", "proc": proc, "lines": lines}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except Exception:  # noqa: BLE001 - make sure, then report
                os.killpg(proc.pid, signal.SIGKILL)
                raise


def test_operator_watches_the_fleet_and_approves_a_version(served_fleet, page, model_dir, tmp_path):  # noqa: F811
    from windfleet.cloud.backends import Backend
    from windfleet.cloud.registry import Registry
    from windfleet.demo import stamp

    url, home = served_fleet["url"], served_fleet["home"]

    # overview: every gateway with the model it runs (v1.0.2 after the demo's rollout and rollback)
    page.goto(url + "/")
    for i in range(1, GATEWAYS + 1):
        cell = page.locator(f'tr.gateway[data-thing="gw{i:02d}"] td.model-version')
        cell.wait_for()
        assert cell.inner_text() == "1.0.2"
    assert page.locator("a.turbine").count() == GATEWAYS * TURBINES
    shot(page, "fleet-overview")

    # a turbine: feature errors with a threshold line at every point
    page.goto(url + "/turbines/gw01-t00")
    rps = page.locator('.chart[data-feature="rps"][data-points]')
    rps.wait_for()
    points = int(rps.get_attribute("data-points"))
    assert points > 10
    assert int(rps.get_attribute("data-threshold-points")) == points
    shot(page, "fleet-turbine")

    # the injected anomalies, as the detectors flagged them
    page.goto(url + "/anomalies")
    page.locator("tr.anomaly-row").first.wait_for(timeout=30_000)
    assert page.locator("tr.anomaly-row").count() > 0
    shot(page, "fleet-anomalies")

    # the data scientist registers v1.0.5; the operator approves it from the registry page
    registry = Registry(Backend.local(home))
    entry = registry.register(stamp(model_dir, tmp_path / "v4", "1.0.5"))
    page.goto(url + "/registry")
    row = f'tr.version-row[data-version="{entry["version"]}"]'
    page.locator(f"{row} button.approve").wait_for()
    version = str(entry["version"])
    page.fill("#token", "")
    page.locator(f"{row} button.approve").click()
    page.fill("#reason", "v1.0.5 passed review")
    with page.expect_response(lambda r: r.url.endswith(f"/api/registry/{version}/approve")) as refused:
        page.click("#decide-confirm")
    page.wait_for_selector('#message[data-status="401"]')
    assert (refused.value.status, refused.value.json()) == (
        401, {"error": "approve/reject need the dashboard token as 'Authorization: Bearer <token>'"})
    assert page.inner_text("#message") == (f"approve {version} refused (401): approve/reject need the dashboard "
                                           "token as 'Authorization: Bearer <token>'")
    assert registry.get(entry["version"])["status"] == "PendingManualApproval"

    page.fill("#token", served_fleet["token"])
    with page.expect_response(lambda r: r.url.endswith(f"/api/registry/{version}/approve"),
                              timeout=60_000) as answer:
        page.click("#decide-confirm")
    page.wait_for_selector('#message[data-status="200"]', timeout=60_000)
    assert answer.value.status == 200
    body = answer.value.json()
    result = body["result"]
    assert (body["version"], body["action"]) == (version, "approve")
    assert (result["version"], result["status"], result["arn"]) == (
        entry["version"], "Approved", registry.get(entry["version"])["arn"])
    assert result["deployment"]["status"] == "deployed", result["deployment"]
    assert page.inner_text("#message") == f"approve {version}: accepted (recorded as {body['actor']})"
    assert [(d["actor"], d["reason"]) for d in registry.get(entry["version"])["decisions"]] == [
        (body["actor"], "v1.0.5 passed review")]
    assert registry.get(entry["version"])["status"] == "Approved"
    # the deployment the answer names is the one the deployment service now lists as the latest
    deployments = _get(url + "/api/deployments")["deployments"]
    assert result["deployment"]["deploymentId"] in [d["deploymentId"] for d in deployments]
    shot(page, "fleet-registry")

    # ... and the fleet rolls it out: every gateway reports and scores with 1.0.5
    def on_v4():
        gateways = _get(url + "/api/fleet")["gateways"]
        return len(gateways) == GATEWAYS and all(g["model_version"] == "1.0.5" for g in gateways)

    wait_until(on_v4, 120, 1.0, "every gateway on 1.0.5")
    page.goto(url + "/")
    page.wait_for_selector('tr.gateway[data-thing="gw01"] td.model-version:text("1.0.5")')
    shot(page, "fleet-overview-after-approval")

    # Ctrl-C: the books close and nothing is left running (the page first, or its live updates
    # would log the server going away as console errors)
    page.goto("about:blank")
    proc = served_fleet["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(120) == 0, "".join(served_fleet["lines"])[-3000:]
    report = json.loads((served_fleet["work"] / "report.json").read_text())
    assert report["counters_source"] == "component logs (final totals)"
    assert report["readings_unscored"] == 0 and report["telemetry_lost"] == 0
    assert set(report["model_version"].values()) == {"1.0.5"}
    assert leftovers(served_fleet["work"]) == []
