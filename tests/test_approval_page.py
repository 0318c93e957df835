"""The approval page and the fleet page, in headless Chromium, over the real local backend:
registry (SageMaker stand-in), artifact store, deployment service, telemetry store.

One scene for the module: three packages (v1 approved by alice and running on the fleet,
v2 pending with better metrics, v3 rejected by bob), four gateways (healthy, in the middle
of a deployment, one with a BROKEN detector whose error is many lines long, one offline),
served by uvicorn with two named tokens."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from windfleet import payloads, topics
from windfleet.cloud import deployer, settings
from windfleet.cloud.backends import Backend
from windfleet.cloud.dashboard.app import create_app
from windfleet.cloud.dashboard.synth import Episode, fleet_messages
from windfleet.cloud.ingest import TelemetryStore
from windfleet.cloud.registry import Registry
from windfleet.cloud.testing import fake_build, fake_model_dir

from tests.browser_fixtures import Served, chromium, watched_page

ARTIFACTS = Path(__file__).parent / "artifacts"
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"
BROKEN_ERROR = ("onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf: [ONNXRuntimeError] : 7 : "
                "INVALID_PROTOBUF : Load model from /tmp/tmpa1b2c3/packages/artifacts/com.windfleet.AnomalyModel/"
                "1.0.2/model.onnx failed:Protobuf parsing failed.\nTraceback (most recent call last):\n"
                "  File \"/greengrass/v2/work/detector.py\", line 88, in load\n    session = ort.InferenceSession(p)")


def rich_model_dir(path: Path, version: str, f1: float, far: float, recall: dict, thresholds: float,
                   parent: str | None = None) -> Path:
    """A model package whose card has what training writes (held-out metrics per detector,
    per-kind results, training data), plus an evaluation.json."""
    d = fake_model_dir(path, version, payload=f"onnx {version}".encode() * 100)
    card = json.loads((d / "model.json").read_text())
    card["metrics"] = {"autoencoder": {"precision": 0.9, "recall": 0.9, "f1": f1, "false_alarm_rate": far},
                       "isolation_forest": {"precision": 0.5, "recall": 0.4, "f1": 0.44, "false_alarm_rate": 0.01},
                       "pca": {"precision": 0.7, "recall": 0.6, "f1": 0.65, "false_alarm_rate": 0.004},
                       "per_kind_f1": {k: r - 0.01 for k, r in recall.items()}, "val_loss": 0.3}
    card["window"] = {"size": 100, "stride": 10, "shape": [6, 10, 10]}
    card["thresholds"] = {f: thresholds * (i + 1) for i, f in enumerate(card["features"])}
    card["training"] = {"seed": 7, "data": {"kind": "simulated", "seed": 7, "turbines": 12, "hours": 6.0}}
    if parent:
        card["lineage"] = {"parent": parent}
    (d / "model.json").write_text(json.dumps(card))
    (d / "evaluation.json").write_text(json.dumps({"detectors": {"autoencoder": {
        "overall": card["metrics"]["autoencoder"],
        "per_kind": {k: {"recall": r, "f1": r - 0.01} for k, r in recall.items()}}}}))
    return d


def call(url: str, method: str = "GET", token: str | None = None, body: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _telemetry(store: TelemetryStore, now: float) -> None:
    things = ["gw01", "gw02", "gw03"]
    raws = [payloads.encode(m) for _, m in fleet_messages(
        things, 3, now - 60, 60, period_s=2.0, model_version="1.0.0",
        episodes=[Episode("gw02-t01", now - 10, now + 1, ("rps",))])]
    store.ingest_many(raws)
    broken = payloads.telemetry("gw03", store.loss()["gw03"]["max_seq"] + 1, now, [{"type": "health", "body": payloads.health(
        "gw03", settings.DETECTOR, "1.0.0", "BROKEN", now, {}, reason=BROKEN_ERROR)}])
    store.ingest(payloads.encode(broken))
    old = [payloads.encode(m) for _, m in fleet_messages(["gw04"], 2, now - 900, 20, period_s=2.0)]
    store.ingest_many(old, received_at=now - 880)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approval")
    backend = Backend.local(tmp / "home", thing_group="fleet")
    deployer.publish(backend, fake_build(tmp / "gb"))
    gg = backend.greengrassv2
    for thing in ("gw01", "gw02", "gw03", "gw04"):
        gg.register_core_device(thing, ["fleet"])
    registry = Registry(backend)
    recall = {"bearing": 0.81, "imbalance": 0.9, "electrical": 0.77}
    registry.register(rich_model_dir(tmp / "v1", "1.0.0", 0.84, 0.002, recall, 1.0))
    dep = registry.approve(1, "baseline model, reviewed in the weekly meeting", actor="alice")["deployment"]
    installed = {c: {"componentVersion": s["componentVersion"]} for c, s in dep["components"].items()}
    for thing, status in (("gw01", "SUCCEEDED"), ("gw02", "SUCCEEDED"), ("gw03", "IN_PROGRESS")):
        gg.report_device_status(thing, dep["deploymentId"], status,
                                components=installed if status == "SUCCEEDED" else None)
    better = {"bearing": 0.93, "imbalance": 0.92, "electrical": 0.7}
    registry.register(rich_model_dir(tmp / "v2", "1.1.0", 0.91, 0.001, better, 1.25, parent="1.0.0"))
    registry.register(rich_model_dir(tmp / "v3", "1.2.0", 0.62, 0.02, recall, 0.8))
    registry.reject(3, "F1 0.62: worse than the fleet's, no reason to ship", actor="bob")

    store = TelemetryStore(tmp / "telemetry.sqlite")
    _telemetry(store, time.time())
    served = Served(create_app(store, registry=registry, greengrass=gg, tokens={"alice": ALICE, "bob": BOB},
                               poll_ms=500))
    try:
        yield {"url": served.url, "registry": registry, "backend": backend, "store": store, "tmp": tmp}
    finally:
        served.close()
        store.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    with watched_page(browser, 1600) as (pg, errors, _):
        yield pg
    assert [e for e in errors if "401" not in e and "400" not in e] == []


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"approval-{name}.png"), full_page=True)


# ------------------------------------------------------------------------------ API
def test_registry_rows_say_what_an_approver_decides_from(scene):
    status, reg = call(scene["url"] + "/api/registry")
    assert status == 200
    rows = {r["version"]: r for r in reg["versions"]}
    v1, v2, v3 = rows["1"], rows["2"], rows["3"]
    assert [v1["model_version"], v2["model_version"], v3["model_version"]] == ["1.0.0", "1.1.0", "1.2.0"]
    assert (v2["f1"], v2["false_alarm_rate"]) == (0.91, 0.001)
    assert v2["per_kind_recall"] == {"bearing": 0.93, "imbalance": 0.92, "electrical": 0.7}
    assert v2["baselines_f1"] == {"isolation_forest": 0.44, "pca": 0.65}
    assert v2["training"]["summary"] == "simulated: 12 turbines x 6.0 h, seed 7"
    assert (len(v2["features"]), v2["window"], v2["stride"], v2["lineage"]) == (6, 100, 10, "parent 1.0.0")
    assert v2["size_bytes"] == len(b"onnx 1.1.0" * 100) and len(v2["sha256"]) == 64
    assert [v1["actions"], v2["actions"], v3["actions"]] == [[], ["approve", "reject"], []]
    # the fleet runs v1: two devices report its component installed
    assert reg["fleet"]["source"] == "devices" and reg["fleet"]["version"] == "1" and v1["running"]
    assert "2 of 4 core devices" in reg["fleet"]["detail"]
    assert [(d["status"], d["actor"]) for d in v3["decisions"]] == [("Rejected", "bob")]


def test_compare_gives_deltas_thresholds_and_no_invented_canary_data(scene):
    status, c = call(scene["url"] + "/api/registry/2/compare")
    assert status == 200 and c["deployed"]["version"] == "1"
    metrics = {m["key"]: m for m in c["metrics"]}
    assert metrics["f1"]["delta"] == pytest.approx(0.07) and metrics["false_alarm_rate"]["delta"] == pytest.approx(-0.001)
    assert metrics["recall:electrical"]["delta"] == pytest.approx(-0.07)
    assert {t["feature"]: t["ratio"] for t in c["thresholds"]}["rps"] == 1.25
    assert c["canary"]["available"] is False and "no canary data" in c["canary"]["note"]


def test_decisions_need_the_token_a_reason_and_a_pending_version(scene):
    url = scene["url"] + "/api/registry/{}/{}"
    assert call(url.format(2, "approve"), "POST", None, {"reason": "x"})[0] == 401
    status, body = call(url.format(2, "approve"), "POST", ALICE, {"reason": "  "})
    assert status == 400 and "reason is required" in body["error"]
    status, body = call(url.format(1, "reject"), "POST", ALICE, {"reason": "changed my mind"})
    assert status == 409 and "is Approved" in body["error"]
    assert call(url.format(3, "approve"), "POST", ALICE, {"reason": "retry"})[0] == 409
    assert scene["registry"].get(2)["status"] == "PendingManualApproval"


# ------------------------------------------------------------------------------ browser
@pytest.mark.browser
@pytest.mark.slow
def test_registry_page_sorts_compares_and_records_an_approval(scene, page):
    url = scene["url"]
    page.goto(url + "/registry")
    rows = page.locator("tr.version-row")
    rows.first.wait_for()
    # one row per model version, model version first, package second; newest package first
    assert page.locator("#registry th").nth(0).inner_text().startswith("Model version")
    assert page.locator("#registry th").nth(1).inner_text().startswith("Package")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.version)") == ["3", "2", "1"]
    # actions only where they apply: decisions on the pending version, compare on any the fleet does not run
    assert page.locator('tr.version-row[data-version="1"] button').count() == 0
    assert page.locator('tr.version-row[data-version="3"] button').all_inner_texts() == ["Compare"]
    assert page.locator('tr.version-row[data-version="2"] button').all_inner_texts() == ["Compare", "Approve", "Reject"]
    assert page.locator('tr.version-row[data-version="1"] [data-running="true"]').count() == 1
    # sort by F1 (ascending, then descending)
    page.locator('#registry th[data-sort="3"]').click()
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.version)") == ["3", "1", "2"]
    page.locator('#registry th[data-sort="3"]').click()
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.version)") == ["2", "1", "3"]
    row2 = page.locator('tr.version-row[data-version="2"]')
    assert "simulated: 12 turbines x 6.0 h" in row2.inner_text() and "bearing" in row2.inner_text()

    # compare with what the fleet runs: tables, two uPlot charts, and no canary data
    row2.locator("button.compare").click()
    page.locator("#compare-metrics tr.metric-row").first.wait_for()
    assert page.locator('#compare-metrics tr[data-metric="f1"] td.delta').inner_text() == "+0.070"
    assert "better" in page.locator('#compare-metrics tr[data-metric="f1"] td.delta').get_attribute("class")
    assert "worse" in page.locator('#compare-metrics tr[data-metric="recall:electrical"] td.delta').get_attribute("class")
    assert page.locator("#compare-thresholds tr.threshold-row").count() == 6
    assert page.locator(".compare-charts canvas").count() == 2
    assert page.evaluate("() => wfCharts.compareThresholds.data[1]")[:2] == [1.25, 1.25]
    assert "no canary data" in page.inner_text("#canary")
    assert "2 of 4 core devices" in page.inner_text("#fleet-source")
    shot(page, "compare")

    # approve with a reason, as bob (the token's name, not anything the page claims)
    page.fill("#token", BOB)
    row2.locator("button.approve").click()
    assert page.locator("#decide-confirm").is_disabled()  # no reason, no decision
    page.fill("#reason", "F1 +0.07, false alarms halved; electrical recall -0.07 accepted")
    with page.expect_response(lambda r: r.url.endswith("/api/registry/2/approve")) as answer:
        page.click("#decide-confirm")
    assert answer.value.status == 200 and answer.value.json()["actor"] == "bob"
    page.wait_for_selector('#message[data-status="200"]')
    assert page.inner_text("#message") == "approve 2: accepted (recorded as bob)"

    # after a reload the decision and the history are there, from the registry itself
    page.reload()
    page.wait_for_selector('tr.version-row[data-version="2"] [data-status="Approved"]')
    assert page.locator('tr.version-row[data-version="2"] :is(button.approve, button.reject)').count() == 0
    assert page.inner_text('tr.version-row[data-version="2"] a.last-decision') == "Approved by bob"
    history = page.locator("#history tr.decision-row")
    assert history.evaluate_all("rs => rs.map(r => [r.dataset.version, r.dataset.decision, r.dataset.actor])") == [
        ["2", "Approved", "bob"], ["3", "Rejected", "bob"], ["1", "Approved", "alice"]]
    assert history.first.locator("td.reason").inner_text() == (
        "F1 +0.07, false alarms halved; electrical recall -0.07 accepted")
    shot(page, "registry-history")
    decided = scene["registry"].get(2)
    assert decided["status"] == "Approved"
    assert [(d["status"], d["actor"]) for d in decided["decisions"]] == [("Approved", "bob")]


@pytest.mark.browser
@pytest.mark.slow
def test_fleet_page_at_a_glance(scene, page):
    page.goto(scene["url"] + "/")
    page.locator("tr.gateway").first.wait_for()
    counts = {s: page.locator(f'[data-state-count="{s}"] strong').inner_text()
              for s in ("healthy", "degraded", "broken", "offline")}
    assert counts == {"healthy": "2", "degraded": "0", "broken": "1", "offline": "1"}
    assert page.locator("#open-anomalies").get_attribute("data-count") == "1"  # gw02-t01, still anomalous
    # most urgent first
    assert page.locator("tr.gateway").evaluate_all("rs => rs.map(r => r.dataset.thing)") == [
        "gw03", "gw04", "gw01", "gw02"]
    # deployments in progress, with their devices (v1's to the fleet; v2's canary, approved above)
    boxes = page.locator(".progress-box.active")
    devices = boxes.evaluate_all("bs => bs.map(b => Number(b.dataset.devices))")
    assert sum(devices) == 4 and "devices done" in boxes.first.inner_text()
    # the detector's long error: one line, the whole text on demand
    error = page.locator('tr.gateway[data-thing="gw03"] details.error')
    summary = error.locator("summary").inner_text()
    assert "\n" not in summary and summary.startswith("AnomalyDetector: onnxruntime") and summary.endswith("…")
    assert not page.locator('tr.gateway[data-thing="gw03"] pre.error-full').is_visible()
    error.locator("summary").click()
    assert "Traceback" in page.locator('tr.gateway[data-thing="gw03"] pre.error-full').inner_text()
    time.sleep(1.2)  # two polls re-render the table: what the user opened stays open
    assert page.locator('tr.gateway[data-thing="gw03"] pre.error-full').is_visible()
    # filter by state
    page.locator('[data-state-count="healthy"]').click()
    page.wait_for_function("() => document.querySelectorAll('tr.gateway').length === 2")
    assert set(page.locator("tr.gateway").evaluate_all("rs => rs.map(r => r.dataset.state)")) == {"healthy"}
    page.locator('[data-state-count="healthy"]').click()
    page.wait_for_function("() => document.querySelectorAll('tr.gateway').length === 4")
    shot(page, "fleet")


@pytest.mark.browser
@pytest.mark.slow
def test_fleet_page_pages_200_gateways(tmp_path, browser):
    now = time.time()
    things = [f"gw{i:03d}" for i in range(200)]
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        store.ingest_many([payloads.encode(m) for _, m in fleet_messages(things, 2, now - 4, 4, period_s=2.0)])
        served = Served(create_app(store, token=ALICE, poll_ms=1000))
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        try:
            pg = context.new_page()
            pg.goto(served.url + "/")
            pg.locator("tr.gateway").first.wait_for()
            assert pg.locator("tr.gateway").count() == 50
            assert pg.inner_text("#page-info") == "1–50 of 200"
            assert pg.locator('[data-state-count="healthy"] strong').inner_text() == "200"
            pg.click("#page-next")
            pg.wait_for_selector('tr.gateway[data-thing="gw050"]')
            assert pg.inner_text("#page-info") == "51–100 of 200"
            pg.fill("#fleet-search", "gw19")
            pg.wait_for_function("() => document.querySelectorAll('tr.gateway').length === 10")
            assert pg.inner_text("#page-info") == "1–10 of 10 (filtered from 200)"
            pg.screenshot(path=str(ARTIFACTS / "approval-fleet-200.png"), full_page=False)
        finally:
            context.close()
            served.close()


def test_tokens_file_names_each_engineer(tmp_path):
    import click

    from windfleet.cloud.dashboard.cli import load_tokens

    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"alice": ALICE, "bob smith": BOB}))
    path.chmod(0o600)
    assert load_tokens(path) == {"alice": ALICE, "bob smith": BOB}
    for content, mode, message in [
            ({"alice": ALICE}, 0o644, "readable by others: chmod 600"),
            ({"alice": "short"}, 0o600, "at least 16 characters"),
            ({"alice": ALICE, "bob": ALICE}, 0o600, "two names share a token"),
            ({"al;ice": ALICE}, 0o600, "actor 'al;ice' must be"),
            ([ALICE], 0o600, "must be a JSON object")]:
        path.write_text(json.dumps(content))
        path.chmod(mode)
        with pytest.raises(click.ClickException, match=message):
            load_tokens(path)
