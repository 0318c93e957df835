"""The operator dashboard: JSON API (auth, validation) over a real uvicorn server,
and the pages in real headless Chromium, fed with telemetry that travels through
a real Mosquitto and the ingest service."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest

from windfleet import payloads, topics
from windfleet.cloud.dashboard.app import create_app
from windfleet.cloud.dashboard.synth import THRESHOLDS, Episode, fleet_messages
from windfleet.cloud.ingest import IngestService, TelemetryStore

from tests.browser_fixtures import Served, chromium, watched_page
from tests.mqtt_fixtures import wait_until

ARTIFACTS = Path(__file__).parent / "artifacts"
TOKEN = "test-token-0123456789"
VERSIONS = {"gw1": "1.0.3", "gw2": "1.0.2"}
# what the local Registry says when asked to approve a version an empty home does not have
APPROVE_UNKNOWN_ERROR = "no model package version '1' in group windfleet-anomaly (known: none)"
# DNS rebinding without a DNS server: Chromium resolves these names to loopback, as a
# rebinding attacker's name would resolve once it flips
REBIND_ARGS = ["--host-resolver-rules=MAP evil.example 127.0.0.1"]


# ---------------------------------------------------------------- fakes of the CLOUD helper's API
class FakeGreengrass:
    """boto3-shaped greengrassv2 subset the dashboard reads."""

    def __init__(self):
        self.deployments: list[dict] = []
        self.effective: dict[str, list[dict]] = {}

    def create_deployment(self, targetArn: str, deploymentName: str, components: dict) -> dict:
        dep_id = f"dep-{len(self.deployments) + 1}"
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        for dep in self.deployments:
            if dep["targetArn"] == targetArn:
                dep["isLatestForTarget"] = False
        self.deployments.append({"deploymentId": dep_id, "deploymentName": deploymentName, "targetArn": targetArn,
                                 "deploymentStatus": "ACTIVE", "creationTimestamp": now, "isLatestForTarget": True,
                                 "components": components})
        for thing in VERSIONS:
            self.effective.setdefault(thing, []).append({
                "deploymentId": dep_id, "deploymentName": deploymentName, "targetArn": targetArn,
                "coreDeviceExecutionStatus": "IN_PROGRESS", "creationTimestamp": now, "modifiedTimestamp": now})
        return {"deploymentId": dep_id}

    def list_deployments(self, targetArn=None, historyFilter="LATEST_ONLY", **_):
        deps = [d for d in self.deployments if historyFilter == "ALL" or d["isLatestForTarget"]]
        return {"deployments": [{k: v for k, v in d.items() if k != "components"} for d in deps]}

    def list_effective_deployments(self, coreDeviceThingName: str, **_):
        return {"effectiveDeployments": self.effective.get(coreDeviceThingName, [])}


class FakeRegistry:
    """``Registry(backend)`` shape: list() / approve(version) / reject(version, reason)."""

    def __init__(self, greengrass: FakeGreengrass):
        self.gg = greengrass
        self.versions = {
            "1": {"version": "1", "status": "Approved", "metrics": {"f1": 0.91, "false_alarm_rate": 0.001}},
            "2": {"version": "2", "status": "Rejected", "metrics": {"f1": 0.72}},
            "3": {"version": "3", "status": "PendingManualApproval", "metrics": {"f1": 0.94, "precision": 0.95}},
        }

    def list(self):
        return list(self.versions.values())

    def approve(self, version: str, reason: str = "", actor: str = "windfleet"):
        if version not in self.versions:
            raise KeyError(version)
        self.versions[version].update(status="Approved", reason=reason, actor=actor)
        return self.gg.create_deployment("arn:aws:iot:local:000000000000:thinggroup/windfleet-fleet",
                                         f"windfleet-model-{version}",
                                         {"com.windfleet.AnomalyModel": {"componentVersion": f"1.0.{version}"}})

    def reject(self, version: str, reason: str, actor: str = "windfleet"):
        if version not in self.versions:
            raise KeyError(version)
        self.versions[version].update(status="Rejected", reason=reason, actor=actor)
        return {"version": version, "status": "Rejected"}


# ---------------------------------------------------------------- servers
def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read() or b"null"), resp.headers
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw), exc.headers
        except ValueError:
            return exc.code, raw, exc.headers


class Publisher:
    """A device's own MQTT connection (its credentials, its ACL)."""

    def __init__(self, broker, thing):
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{thing}-fwd-test")
        self.client.username_pw_set(*broker.credentials(thing))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: dict):
        self.client.publish(topic, payloads.encode(payload), qos=1).wait_for_publish(10)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Broker + ingest + dashboard, with two gateways x 3 turbines of telemetry published
    through the broker with each device's own credentials, and an anomaly on gw1-t01."""
    from windfleet.nucleus.broker import Broker

    tmp = tmp_path_factory.mktemp("dash")
    with Broker(tmp / "broker", port=0) as broker:
        for thing in VERSIONS:
            broker.add_device(thing, [topics.turbine_id(thing, n) for n in range(3)])
        store = TelemetryStore(tmp / "telemetry.sqlite")
        service = IngestService(store, broker.host, broker.port, *broker.cloud_credentials(),
                                client_id="dash-test-ingest").start()
        publishers = {thing: Publisher(broker, thing) for thing in VERSIONS}
        now = time.time()
        sent = 0
        for topic, message in fleet_messages(
                list(VERSIONS), 3, now - 120, 120, period_s=1.0, records_per_message=10, model_version=VERSIONS,
                episodes=[Episode("gw1-t01", now - 60, now - 50, ("rps",))]):
            publishers[message["thing"]].send(topic, message)
            sent += 1
        wait_until(lambda: service.stats["stored"] >= sent, 30.0, message=f"all {sent} stored")
        gg = FakeGreengrass()
        registry = FakeRegistry(gg)
        served = Served(create_app(store, registry=registry, greengrass=gg, token=TOKEN, poll_ms=500))
        try:
            yield {"url": served.url, "store": store, "broker": broker, "publishers": publishers, "registry": registry,
                   "greengrass": gg, "service": service, "sent": sent}
        finally:
            served.close()
            for p in publishers.values():
                p.close()
            service.stop()
            store.close()


# ---------------------------------------------------------------- API
@pytest.mark.slow
def test_api_fleet_lists_gateways_with_model_versions_and_no_loss(live):
    status, fleet, headers = request(live["url"] + "/api/fleet")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    gateways = {g["thing"]: g for g in fleet["gateways"]}
    assert {t: g["model_version"] for t, g in gateways.items()} == VERSIONS
    assert [t["turbine_id"] for t in gateways["gw1"]["turbines"]] == ["gw1-t00", "gw1-t01", "gw1-t02"]
    assert all(g["telemetry"]["lost"] == 0 for g in gateways.values())
    assert gateways["gw1"]["turbines"][1]["n_anomalies"] >= 1


@pytest.mark.slow
def test_api_scores_and_input_validation(live):
    status, data, _ = request(live["url"] + "/api/turbines/gw1-t01/scores?limit=50")
    assert status == 200 and len(data["ts"]) == 50 and data["thresholds"]["rps"][0] == THRESHOLDS["rps"]
    for path, code in [("/api/turbines/gw1-t01;drop/scores", 400), ("/api/turbines/gw1-t01/scores?limit=0", 400),
                       ("/api/turbines/gw1-t01/scores?limit=999999", 400), ("/api/turbines/gw1-t01/scores?since=x", 400),
                       ("/api/turbines/gw1-t01/scores?since=inf", 400), ("/api/turbines/gw9-t01/scores", 404),
                       ("/api/anomalies?thing=a%20b", 400), ("/turbines/%3Cscript%3E", 400)]:
        assert request(live["url"] + path)[0] == code, path


@pytest.mark.slow
def test_api_writes_need_the_token_and_reads_do_not(live):
    url = live["url"]
    assert request(url + "/api/registry")[0] == 200
    assert request(url + "/api/registry/3/reject", "POST")[0] == 401
    assert request(url + "/api/registry/3/reject", "POST", {"Authorization": "Bearer wrong"})[0] == 401
    assert request(url + "/api/registry/3/reject", "POST", {"Authorization": f"Basic {TOKEN}"})[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    too_long = json.dumps({"reason": "x" * 501}).encode()
    assert request(url + "/api/registry/3/reject", "POST", auth, too_long)[0] == 400
    reason = json.dumps({"reason": "looks good"}).encode()
    assert request(url + "/api/registry/..%2F3/approve", "POST", auth, reason)[0] in (400, 404)
    assert request(url + "/api/registry/99/approve", "POST", auth, reason)[0] == 404
    assert request(url + "/api/registry/3/delete", "POST", auth, reason)[0] == 404
    assert request(url + "/api/registry/3/approve", "POST", auth, b"{}")[0] == 400  # no reason, no decision
    assert live["registry"].versions["3"]["status"] == "PendingManualApproval"  # nothing above changed it


@pytest.mark.slow
def test_loopback_reads_need_a_loopback_host_name_with_this_port(live):
    """DNS rebinding: a loopback client naming another Host (evil.example resolving to
    127.0.0.1) is refused, 403, for reads and actions, token guesses included."""
    url, port = live["url"], urlparse(live["url"]).port
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert request(url + "/api/fleet", headers={"Host": host})[0] == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}", f"127.0.0.1:{port + 1}",
                 "localhost", f"127.0.0.2:{port}", f"localhost:{port}@evil.example", f"testserver:{port}",
                 f"testclient:{port}", f"[::1]x:{port}"):
        for path in ("/api/fleet", "/", "/registry", "/api/registry", "/turbines/gw1-t01", "/nope"):
            status, body, _ = request(url + path, headers={"Host": host})
            text = body if isinstance(body, bytes) else json.dumps(body).encode()
            assert status == 403 and b"gw1" not in text, (host, path, status)
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Cookie": "windfleet_session=guess"}):
            for action in ("approve", "reject"):
                status, body, _ = request(url + f"/api/registry/3/{action}", "POST",
                                          {"Host": host, "Content-Type": "application/json", **headers}, b"{}")
                assert (status, body["error"].split(":")[0]) == (403, "Host not allowed"), (host, action)
    assert live["registry"].versions["3"]["status"] == "PendingManualApproval"
    assert live["greengrass"].deployments == []
    # the token itself works from any Host (a TLS proxy on this machine passing the public name)
    assert request(url + "/api/fleet", headers={"Host": f"dashboard.example:{port}", **auth})[0] == 200
    # the login form is served to anyone (it holds nothing), and never takes the token from a URL
    status, body, headers = request(url + f"/login?token={TOKEN}")
    assert status == 400 and "set-cookie" not in headers and b"never goes in a URL" in body


@pytest.mark.slow
def test_reject_refuses_an_oversized_body_before_reading_it(live):
    """413 as soon as the size is known: from Content-Length (the server does not wait
    for 50 MB that never come), or while streaming a chunked body."""
    port = urlparse(live["url"]).port
    head = (f"POST /api/registry/3/reject HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # Only 12 of the announced 50 MB are ever sent: a reply at all proves the server did not
        # wait for the body (if it did, the socket's timeout fails the read instead).
        s.sendall((head + "Content-Length: 50000000\r\n\r\n").encode() + b'{"reason": "')
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 413") and b"at most 4096 bytes" in reply, reply[:200]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # no length: counted as it streams
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"1388\r\n" + b"x" * 5000 + b"\r\n")
        reply = _read_reply(s)  # the terminating chunk is never sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert live["registry"].versions["3"]["status"] == "PendingManualApproval"


def _read_reply(sock: socket.socket) -> bytes:
    """One HTTP response (headers + Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # no packet is sent; picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture
def remote(live):
    """The same fleet served on 0.0.0.0, reached through this machine's non-loopback
    address: the client is not on loopback, as an operator's laptop would not be."""
    address = _non_loopback_address()
    if address is None:
        pytest.fail("this machine has no non-loopback IPv4 address to play the remote client from")
    gg = FakeGreengrass()
    registry = FakeRegistry(gg)
    served = Served(create_app(live["store"], registry=registry, greengrass=gg, token=TOKEN, poll_ms=500),
                    host="0.0.0.0")
    try:
        yield {"url": f"http://{address}:{served.port}", "port": served.port, "registry": registry, "greengrass": gg}
    finally:
        served.close()


@pytest.mark.slow
def test_on_0_0_0_0_a_non_loopback_client_always_needs_the_token(remote):
    url, port = remote["url"], remote["port"]
    for path in ("/api/fleet", "/api/registry", "/api/anomalies"):
        assert request(url + path)[0] == 401, path
        # naming localhost does not make a remote client local
        assert request(url + path, headers={"Host": f"localhost:{port}"})[0] == 401, path
        assert request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
    status, body, _ = request(url + "/")
    assert status == 401 and b'<form id="login" method="post" action="/login">' in body
    assert request(url + "/api/fleet", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(url + "/api/registry/3/approve", "POST", body=b"{}")[0] == 401
    assert remote["registry"].versions["3"]["status"] == "PendingManualApproval"


# ---------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    with chromium(REBIND_ARGS) as b:
        yield b


@pytest.fixture
def page(browser):
    with watched_page(browser) as (pg, errors, requests):
        yield pg
    # no script error, and nothing fetched from anywhere but the dashboard (no CDN)
    assert [e for e in errors if "401" not in e and "Unauthorized" not in e] == []
    assert all(u.startswith("http://127.0.0.1:") for u in requests), requests


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


@pytest.mark.browser
@pytest.mark.slow
def test_overview_lists_gateways_with_model_versions(live, page):
    page.goto(live["url"] + "/")
    for thing, version in VERSIONS.items():
        cell = page.locator(f'tr.gateway[data-thing="{thing}"] td.model-version')
        cell.wait_for()
        assert cell.inner_text() == version
    assert page.locator("a.turbine").count() == 6
    # gw1-t01 had an anomaly episode a minute ago: flagged (warn), the others are clean
    assert page.locator('a.turbine.warn').all_inner_texts() == ["gw1-t01"]
    assert page.locator('a.turbine.ok').count() == 5
    shot(page, "overview")


@pytest.mark.browser
@pytest.mark.slow
def test_turbine_chart_has_points_thresholds_and_anomaly_markers(live, page):
    page.goto(live["url"] + "/turbines/gw1-t01")
    rps = page.locator('.chart[data-feature="rps"][data-points]')
    rps.wait_for()
    assert int(rps.get_attribute("data-points")) >= 100
    assert int(rps.get_attribute("data-threshold-points")) == int(rps.get_attribute("data-points"))
    assert int(rps.get_attribute("data-anomaly-points")) >= 5  # the injected episode
    # what uPlot actually holds: an error series, a threshold series at the model's value, markers
    labels, thresholds = page.evaluate(
        "() => [wfCharts.rps.series.map(s => s.label), [...new Set(wfCharts.rps.data[2])]]")
    assert labels[1:] == ["error", "threshold", "anomaly"] and thresholds == [THRESHOLDS["rps"]]
    assert page.locator(".chart canvas").count() == 7  # score + six features
    assert int(page.locator('.chart[data-feature="voltage"]').get_attribute("data-anomaly-points")) == 0
    shot(page, "turbine")


@pytest.mark.browser
@pytest.mark.slow
def test_an_injected_anomaly_appears_in_the_timeline_live(live, page):
    page.goto(live["url"] + "/anomalies")
    page.locator('tr.anomaly-row[data-turbine="gw1-t01"]').first.wait_for()
    assert page.locator('tr.anomaly-row[data-turbine="gw2-t02"]').count() == 0
    # a new anomaly on another gateway, sent through the broker while the page is open
    errors = {f: THRESHOLDS[f] * 0.3 for f in THRESHOLDS} | {"voltage": THRESHOLDS["voltage"] * 4}
    seq = live["store"].loss()["gw2"]["max_seq"] + 1
    message = payloads.telemetry("gw2", seq, time.time(), [
        {"type": "score", "body": payloads.score("gw2-t02", time.time(), VERSIONS["gw2"], 999_990, errors, THRESHOLDS)}])
    live["publishers"]["gw2"].send(topics.telemetry("gw2"), message)
    row = page.locator('tr.anomaly-row[data-turbine="gw2-t02"]')
    row.wait_for(timeout=20_000)
    assert "voltage" in row.inner_text()
    shot(page, "anomalies")


@pytest.mark.browser
@pytest.mark.slow
def test_approve_is_refused_without_the_token_and_starts_a_deployment_with_it(live, page):
    page.goto(live["url"] + "/registry")
    approve = page.locator('tr.version-row[data-version="3"] button.approve')
    approve.wait_for()
    page.fill("#token", "")
    approve.click()
    page.fill("#reason", "F1 0.94 beats the fleet's 0.91")
    page.click("#decide-confirm")
    page.wait_for_selector('#message[data-status="401"]')
    assert page.inner_text("#message") == (
        "approve 3 refused (401): approve/reject need the dashboard token as 'Authorization: Bearer <token>'")
    assert live["registry"].versions["3"]["status"] == "PendingManualApproval"
    assert live["greengrass"].deployments == []

    page.fill("#token", TOKEN)
    with page.expect_response(lambda r: r.url.endswith("/api/registry/3/approve")) as answer:
        page.click("#decide-confirm")  # the form stays open, with its reason, after a refusal
    page.wait_for_selector('#message[data-status="200"]')
    assert answer.value.status == 200 and answer.value.json() == {
        "version": "3", "action": "approve", "actor": "dashboard", "reason": "F1 0.94 beats the fleet's 0.91",
        "result": {"deploymentId": "dep-1"}}
    assert page.inner_text("#message") == "approve 3: accepted (recorded as dashboard)"
    assert live["registry"].versions["3"]["status"] == "Approved"
    assert live["registry"].versions["3"]["actor"] == "dashboard"
    assert [d["deploymentName"] for d in live["greengrass"].deployments] == ["windfleet-model-3"]
    page.locator("tr.deployment-row").first.wait_for()
    assert "windfleet-model-3" in page.inner_text("#deployments")
    page.wait_for_selector('tr.version-row[data-version="3"] [data-status="Approved"]')
    shot(page, "registry")
    # the overview now shows the deployment per device
    page.goto(live["url"] + "/")
    page.wait_for_selector('tr.gateway[data-thing="gw1"] [data-deployment-status="IN_PROGRESS"]')


@pytest.mark.browser
@pytest.mark.slow
def test_dns_rebinding_is_refused_in_chromium(live, browser):
    """Chromium resolves evil.example to 127.0.0.1 (what a rebinding attack achieves):
    the page, the API and approve, all same-origin for the attacker's script, get 403."""
    port = urlparse(live["url"]).port
    before = (json.dumps(live["registry"].versions, sort_keys=True), len(live["greengrass"].deployments))
    context = browser.new_context(bypass_csp=True)  # the attacker runs whatever script it likes
    try:
        pg = context.new_page()
        response = pg.goto(f"http://evil.example:{port}/")
        assert response.status == 403
        assert pg.locator("form#login").count() == 1 and "gw1" not in pg.content()
        seen = pg.evaluate("""async () => {
            const fleet = await fetch('/api/fleet');
            const body = await fleet.text();
            const approve = await fetch('/api/registry/3/approve', {method: 'POST', body: '{}',
                                        headers: {'Content-Type': 'application/json'}});
            const guess = await fetch('/api/registry/3/reject', {method: 'POST', body: '{}',
                                      headers: {'Authorization': 'Bearer guess'}});
            const anomalies = await fetch('/api/anomalies');
            return [fleet.status, body.includes('gw1'), approve.status, guess.status, anomalies.status];
        }""")
        assert seen == [403, False, 403, 403, 403]
    finally:
        context.close()
    assert (json.dumps(live["registry"].versions, sort_keys=True), len(live["greengrass"].deployments)) == before


@pytest.mark.browser
@pytest.mark.slow
def test_a_remote_browser_signs_in_by_form_post_and_acts_only_with_the_token(remote, browser):
    url = remote["url"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    urls: list[str] = []
    context.on("request", lambda req: urls.append(req.url))
    try:
        pg = context.new_page()
        assert pg.goto(url + "/").status == 401  # not local: the sign-in form, no fleet
        assert "gw1" not in pg.content()
        pg.fill("#token", "wrong")
        with pg.expect_navigation():
            pg.click("#login button[type=submit]")
        assert pg.inner_text("#login-message") == "Wrong token." and context.cookies() == []
        pg.fill("#token", TOKEN)
        with pg.expect_navigation():
            pg.click("#login button[type=submit]")
        pg.locator('tr.gateway[data-thing="gw1"] td.model-version').wait_for()
        assert pg.url == url + "/"
        [cookie] = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("windfleet_session", True, "Strict")
        assert cookie["value"] != TOKEN and pg.evaluate("document.cookie") == ""  # scripts cannot read it
        # the session reads; it does not act
        status = pg.evaluate("""async () => (await fetch('/api/registry/3/approve',
            {method: 'POST', body: '{}', headers: {'Content-Type': 'application/json'}})).status""")
        assert status == 401 and remote["registry"].versions["3"]["status"] == "PendingManualApproval"
        pg.goto(url + "/registry")
        pg.locator('tr.version-row[data-version="3"] button.approve').wait_for()
        pg.fill("#token", TOKEN)
        pg.locator('tr.version-row[data-version="3"] button.approve').click()
        pg.fill("#reason", "approved from a remote browser")
        with pg.expect_response(lambda r: r.url.endswith("/api/registry/3/approve")) as answer:
            pg.click("#decide-confirm")
        assert answer.value.status == 200 and answer.value.json()["result"] == {"deploymentId": "dep-1"}
        pg.wait_for_selector('#message[data-status="200"]')
        assert remote["registry"].versions["3"]["status"] == "Approved"
        # sign out: the cookie goes, the pages are closed again
        pg.goto("about:blank")
        pg.request.post(url + "/logout")
        assert context.cookies() == [] and pg.goto(url + "/").status == 401
        assert not any(TOKEN in u for u in urls), "the token travelled in a URL"
    finally:
        context.close()


# ---------------------------------------------------------------- packaging and CLI
def test_vendored_chart_library_matches_its_recorded_digests():
    import hashlib

    vendor = Path(__file__).parents[1] / "cloud" / "dashboard" / "static" / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    recorded = dict(line.split()[::-1] for line in (vendor / "SOURCE").read_text().splitlines()
                    if len(line.split()) == 2 and len(line.split()[0]) == 64)
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    page = (vendor.parents[1] / "page.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing loaded from elsewhere


@pytest.mark.parametrize("args", [["--store", "/proc/nope/t.sqlite"], ["--broker", "localhost:notaport"],
                                  ["--broker", "localhost:0"], ["--host", "nohost.invalid"]])
def test_cli_refuses_bad_arguments_in_one_line_and_leaves_no_files(tmp_path, args):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "windfleet.cli", "dashboard", "--port", "0",
                           "--home", str(work / "home"), *args], cwd=work, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "WINDFLEET_HOME": str(work / "home")})
    assert proc.returncode != 0
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_cli_serves_on_loopback_and_prints_the_token(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from windfleet.cli import main; main()", "dashboard", "--port", str(port), "--home", str(tmp_path / "home"),
         "--no-ingest"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line.startswith("token") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        token = next(line.split(": ", 1)[1] for line in lines if line.startswith("token"))
        assert f"http://127.0.0.1:{port}/" in lines[0]
        base = f"http://127.0.0.1:{port}"
        assert request(base + "/api/fleet")[1]["gateways"] == []
        assert request(base + "/api/registry/1/approve", "POST")[0] == 401
        status, body, _ = request(base + "/api/registry/1/approve", "POST", {"Authorization": f"Bearer {token}"},
                                  b'{"reason": "ok"}')
        assert (status, body) == (404, {"error": APPROVE_UNKNOWN_ERROR}), body  # the token worked; nothing to approve
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_approve_through_the_real_local_registry_starts_a_deployment(tmp_path):
    """The CLOUD area's Registry + local Greengrass behind the same HTTP API."""
    from windfleet.cloud import backends, deployer, testing
    from windfleet.cloud import registry as registry_mod

    backend = backends.Backend.local(tmp_path / "home", thing_group="fleet")
    deployer.publish(backend, testing.fake_build(tmp_path / "gb"))
    registry = registry_mod.Registry(backend)
    registry.register(testing.fake_model_dir(tmp_path / "m1", "1.0.0"))
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        served = Served(create_app(store, registry=registry, greengrass=backend.greengrassv2, token=TOKEN))
        try:
            status, reg, _ = request(served.url + "/api/registry")
            assert status == 200 and [(v["version"], v["status"]) for v in reg["versions"]] == [
                ("1", "PendingManualApproval")]
            assert request(served.url + "/api/registry/1/approve", "POST")[0] == 401
            assert request(served.url + "/api/deployments")[1]["deployments"] == []
            auth = {"Authorization": f"Bearer {TOKEN}"}
            reason = b'{"reason": "first model for the fleet"}'
            assert request(served.url + "/api/registry/7/approve", "POST", auth, reason)[0] == 404
            status, body, _ = request(served.url + "/api/registry/1/approve", "POST", auth, reason)
            assert status == 200, body
            assert body["result"]["deployment"]["status"] == "deployed"
            deployments = request(served.url + "/api/deployments")[1]["deployments"]
            assert len(deployments) == 1 and deployments[0]["deploymentId"] == body["result"]["deployment"]["deploymentId"]
            [row] = request(served.url + "/api/registry")[1]["versions"]
            assert row["status"] == "Approved" and row["actions"] == []
            assert [(d["actor"], d["reason"]) for d in row["decisions"]] == [("dashboard", "first model for the fleet")]
        finally:
            served.close()
