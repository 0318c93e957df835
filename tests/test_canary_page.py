"""The dashboard's canary view in headless Chromium, over the real local backend: a canary of v2
running on one of two gateways, shadow statistics ingested as the detector reports them; the
page charts both models' alarm rates and their agreement, shows the gates and the verdict, and
aborts the canary by hand only with the token and a reason (recorded with the token's name)."""

from __future__ import annotations

import time

import pytest

from windfleet import payloads
from windfleet.cloud import canary, deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.dashboard.app import create_app
from windfleet.cloud.ingest import TelemetryStore
from windfleet.cloud.registry import Registry
from windfleet.cloud.testing import fake_build, fake_model_dir

from tests.browser_fixtures import Served
from tests.test_approval_page import ARTIFACTS, browser, call, page  # noqa: F401 - fixtures

ALICE = "alice-token-0123456789"


def _shadow(windows: int, current: int, candidate: int, both: int) -> dict:
    model = {"score_p50": 0.3, "score_p90": 0.6, "score_p99": 1.4, "infer_ms_p50": 0.2, "infer_ms_p99": 0.5}
    return payloads.shadow_stats(
        "2.0.0", "1.0.0", time.time(), windows,
        {**model, "alarms": current, "alarm_rate": current / windows},
        {**model, "alarms": candidate, "alarm_rate": candidate / windows},
        either_flagged=current + candidate - both, both_flagged=both)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary-page")
    backend = Backend.local(tmp / "home", thing_group="fleet")
    deployer.publish(backend, fake_build(tmp / "gb"))
    for thing in ("gw01", "gw02"):
        backend.greengrassv2.register_core_device(thing, ["fleet"])
    registry = Registry(backend)
    registry.register(fake_model_dir(tmp / "v1", "1.0.0"))
    registry.approve(1, "baseline", actor="alice")
    canary.save_config(backend, {"devices": 1, "min_seconds": 0, "min_windows": 100})
    registry.register(fake_model_dir(tmp / "v2", "2.0.0"))
    started = registry.approve(2, "better on bearings", actor="alice")["deployment"]
    assert started["status"] == "canary", started
    (thing,) = started["devices"]
    store = TelemetryStore(backend.home / "telemetry.sqlite")
    t0 = canary.load_state(backend)["started"]
    # the candidate alarms more and more as the wind picks up: its rate leaves the limit
    for i, (w, cur, cand, both) in enumerate([(60, 1, 1, 1), (150, 2, 4, 2), (300, 4, 30, 4), (450, 6, 80, 6)]):
        body = payloads.health(thing, settings.DETECTOR, "1.0.0", "RUNNING", t0 + 1 + i, {},
                               model_version="1.0.0", shadow=_shadow(w, cur, cand, both))
        assert store.ingest(payloads.encode(payloads.telemetry(thing, i, t0 + 1 + i, [{"type": "health", "body": body}])),
                            received_at=t0 + 1 + i) == "stored"
    served = Served(create_app(store, registry=registry, greengrass=backend.greengrassv2, tokens={"alice": ALICE},
                               poll_ms=500))
    try:
        yield {"url": served.url, "registry": registry, "backend": backend, "thing": thing}
    finally:
        served.close()
        store.close()


def test_canary_page_charts_gates_and_aborts_with_the_token(scene, page):
    url = scene["url"]
    status, view = call(url + "/api/canary")
    assert status == 200 and view["verdict"] == "abort" and len(view["series"]) == 4
    assert [round(p["candidate_alarm_rate"], 4) for p in view["series"]] == [0.0167, 0.0267, 0.1, 0.1778]

    page.goto(url + "/canary")
    page.wait_for_selector("#canary-gates .gate-row")
    assert page.get_attribute("#canary-chart", "data-points") == "4"
    assert page.get_attribute("#canary-verdict", "data-verdict") == "abort"
    assert "candidate alarm rate 0.1778" in page.inner_text("#canary-reason")
    assert page.get_attribute('.gate-row[data-gate="alarm_rate"]', "data-passed") == "false"
    assert page.get_attribute('.gate-row[data-gate="agreement"]', "data-passed") == "false"
    assert page.inner_text(f'.canary-device[data-thing="{scene["thing"]}"]').split("\t")[1].strip() == "450"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "canary-page.png"), full_page=True)

    # without the token: refused, nothing changes
    page.click("#canary-abort")
    page.fill("#reason", "alarms on normal data")
    page.click("#decide-confirm")
    page.wait_for_selector('#message[data-status="401"]')
    assert canary.load_state(scene["backend"])["status"] == "running"
    # the token in a URL is no way in either; a reason is required
    assert call(url + "/api/canary/abort?token=" + ALICE, "POST", body={"reason": "x"})[0] == 401
    assert call(url + "/api/canary/abort", "POST", token=ALICE, body={"reason": " "})[0] == 400

    page.fill("#token", ALICE)
    page.dispatch_event("#token", "change")
    page.fill("#reason", "alarms on normal data")
    page.click("#decide-confirm")
    page.wait_for_selector('#message[data-status="200"]')
    page.wait_for_selector('#canary-verdict[data-verdict="aborted"]')
    assert page.is_disabled("#canary-promote") and page.is_disabled("#canary-abort")
    state = canary.load_state(scene["backend"])
    assert (state["status"], state["actor"], state["reason"]) == ("aborted", "alice", "alarms on normal data")
    info = scene["registry"].get(2)
    assert info["status"] == "Rejected" and "alarms on normal data" in info["description"]
    assert call(url + "/api/canary/promote", "POST", token=ALICE, body={"reason": "late"})[0] == 409
    page.screenshot(path=str(ARTIFACTS / "canary-page-aborted.png"), full_page=True)
