"""The dashboard's drift view in headless Chromium, over a real store and the local registry: a
turbine whose voltage drifts past the card's threshold is charted per feature with its threshold
line, its model version is flagged "retrain suggested" on the drift page and the registry page,
and the fleet page counts the drifted turbine.  Screenshot: tests/artifacts/drift-page.png."""

from __future__ import annotations

import time

import pytest

from windfleet import payloads
from windfleet.cloud.backends import Backend
from windfleet.cloud.dashboard.app import create_app
from windfleet.cloud.ingest import TelemetryStore
from windfleet.cloud.registry import Registry
from windfleet.cloud.testing import fake_model_dir
from windfleet.model_contract import FEATURES

from tests.browser_fixtures import Served
from tests.test_approval_page import ARTIFACTS, browser, call, page  # noqa: F401 - fixtures

LIMITS = {f: 0.25 for f in FEATURES}
REPORTS = 20


def _drift(turbine: str, version: str, ts: float, voltage: float) -> dict:
    score = {f: 0.03 for f in FEATURES} | {"voltage": voltage}
    return {"type": "drift", "body": payloads.drift(turbine, version, ts, 2000, score, LIMITS)}


def _score(turbine: str, version: str, ts: float, seq: int) -> dict:
    return {"type": "score", "body": payloads.score(turbine, ts, version, seq, {f: 0.1 for f in FEATURES},
                                                    {f: 1.0 for f in FEATURES})}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-page")
    backend = Backend.local(tmp / "home", thing_group="fleet")
    registry = Registry(backend)
    registry.register(fake_model_dir(tmp / "v1", "1.0.0"))
    registry.register(fake_model_dir(tmp / "v2", "2.0.0"))
    store = TelemetryStore(tmp / "telemetry.sqlite")
    now = time.time()
    t0 = now - REPORTS * 5
    seqs = {"gw01": 0, "gw02": 0}

    def send(thing: str, *records: dict) -> None:
        assert store.ingest(payloads.encode(payloads.telemetry(thing, seqs[thing], now, list(records)))) == "stored"
        seqs[thing] += 1

    for k in range(REPORTS):
        ts = t0 + 5 * k
        # gw01-t00's voltage sensor drifts: its PSI climbs past the threshold half way through
        send("gw01", _drift("gw01-t00", "1.0.0", ts, 0.03 + 0.03 * k), _drift("gw01-t01", "1.0.0", ts, 0.04),
             _score("gw01-t00", "1.0.0", ts, 10 * k), _score("gw01-t01", "1.0.0", ts, 10 * k))
        send("gw02", _drift("gw02-t00", "2.0.0", ts, 0.05), _score("gw02-t00", "2.0.0", ts, 10 * k))
    served = Served(create_app(store, registry=registry, poll_ms=500))
    try:
        yield {"url": served.url}
    finally:
        served.close()
        store.close()


def test_drift_page_charts_thresholds_and_flags_retraining(scene, page):
    url = scene["url"]
    status, view = call(url + "/api/drift")
    assert status == 200 and view["flagged"] == ["gw01-t00"]
    flags = {m["model_version"]: m["retrain_suggested"] for m in view["models"]}
    assert flags == {"1.0.0": True, "2.0.0": False}
    status, series = call(url + "/api/turbines/gw01-t00/drift?limit=5")
    assert status == 200 and len(series["ts"]) == 5 and series["drifted"]["voltage"] == [True] * 5
    assert call(url + "/api/turbines/gw09-t00/drift")[0] == 404
    assert call(url + "/api/turbines/not-a-turbine/drift")[0] == 400

    page.goto(url + "/drift")
    page.wait_for_selector('#drift-models tr.drift-model[data-model-version="1.0.0"][data-retrain="true"]')
    assert page.inner_text('tr.drift-model[data-model-version="1.0.0"] [data-flag="retrain"]') == "retrain suggested"
    assert page.get_attribute('tr.drift-model[data-model-version="2.0.0"]', "data-retrain") == "false"
    assert page.get_attribute('tr.drift-turbine[data-turbine="gw01-t00"]', "data-drifted") == "true"
    assert "voltage 0.600 > 0.250" in page.inner_text('tr.drift-turbine[data-turbine="gw01-t00"]')
    # the first drifted turbine is charted: every feature, each with its threshold line
    voltage = page.wait_for_selector('#drift-charts .chart[data-feature="voltage"][data-points="20"]')
    assert voltage.get_attribute("data-threshold-points") == "20"
    drifted = sum(0.03 + 0.03 * k > 0.25 for k in range(REPORTS))
    assert voltage.get_attribute("data-drifted-points") == str(drifted)
    assert page.locator("#drift-charts .chart").count() == len(FEATURES)
    assert page.evaluate("window.wfCharts.voltage.data[2].every((v) => v === 0.25)")
    assert page.get_attribute("#drift-chart-title", "data-turbine") == "gw01-t00"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "drift-page.png"), full_page=True)

    page.click('tr.drift-turbine[data-turbine="gw02-t00"]')
    page.wait_for_selector('#drift-chart-title[data-turbine="gw02-t00"]')
    assert page.get_attribute('#drift-charts .chart[data-feature="voltage"]', "data-drifted-points") == "0"

    page.goto(url + "/registry")
    page.wait_for_selector('#registry tr.version-row[data-model-version="1.0.0"] [data-retrain="true"]')
    assert "1 of 2 turbines drifted" in page.inner_text('tr.version-row[data-model-version="1.0.0"]')
    assert page.locator('tr.version-row[data-model-version="2.0.0"] [data-retrain="false"]').count() == 1

    page.goto(url + "/")
    page.wait_for_selector('#drifted-turbines[data-count="1"]')
    assert "drifted" in page.get_attribute('a.badge.turbine[data-turbine="gw01-t00"]', "class")
