"""Data capture: the detector's sampler, the forwarder's capture spool and its upload to S3.

Unit level: the sampling policy (every flagged window, a fraction of normal ones, a hard
per-minute bound, labels), the detector's scoring path publishing raw windows, the spool's
bound and drop order, the object format, and the upload with moto's S3.  As real
processes: the project's forwarder under a local nucleus uploads to the local backend's
S3 endpoint with credentials it got from the nucleus' token exchange service only
(credentials of any other origin are refused); S3 down then up, and ``kill -9`` in the
middle of an upload, lose nothing the forwarder had acknowledged.
"""

from __future__ import annotations

import gzip
import json
import re
import threading

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from windfleet import model_contract as mc
from windfleet import payloads, topics
from windfleet.build import build
from windfleet.cloud.local.s3_server import S3Endpoint
from windfleet.cloud.settings import BUCKET
from windfleet.components.bus.base import Bus
from windfleet.components.detector import capture as detector_capture
from windfleet.components.detector.capture import CaptureSampler
from windfleet.components.forwarder import Forwarder, Spool
from windfleet.components.forwarder.capture import CaptureSpool, Uploader
from windfleet.nucleus.tes import CredentialAuthority
from tests.aws_fixtures import fake_aws_env
from tests.ipc_fixtures import Nucleus, recipe_access_control
from tests.mqtt_fixtures import wait_until

THING = "gw1"
FWD, DET = "com.windfleet.LogForwarder", "com.windfleet.AnomalyDetector"
KEY = re.compile(r"^captures/gw1/\d{4}/\d{2}/\d{2}/\d{13}-\d+\.jsonl\.gz$")
F = len(mc.FEATURES)


class MemoryBus(Bus):
    """Synchronous in-process bus: what a component published, and handlers to deliver to."""

    def __init__(self, thing=THING, config=None):
        self.thing_name, self.version = thing, "1.0.0"
        self.config = config or {}
        self.handlers: dict[str, list] = {}
        self.published: list[tuple[str, dict]] = []
        self.states: list[dict] = []

    def publish(self, topic, payload, qos=0):
        data = payload if isinstance(payload, bytes) else payloads.encode(payload)
        self.published.append((topic, json.loads(data)))
        for handler in self.handlers.get(topic, []):
            handler(topic, data)

    def subscribe(self, topic, handler):
        self.handlers.setdefault(topic, []).append(handler)

    def publish_cloud(self, topic, payload, qos=1):
        return True

    def subscribe_cloud(self, topic, handler):
        pass

    def get_configuration(self, component=None):
        return dict(self.config)

    def on_configuration_update(self, handler, component=None):
        pass

    def update_state(self, state, **extra):
        self.states.append({"state": state, **extra})

    def close(self):
        pass

    def captures(self) -> list[dict]:
        return [body for topic, body in self.published if topic == topics.capture(self.thing_name)]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def window_record(n: int, flagged: bool = False, turbine: str = "gw1-t00", rows: int = 4) -> dict:
    """A captured window whose rows encode ``n`` (so the test can find it anywhere)."""
    errors = [2.0 if flagged else 0.5] + [0.1] * (F - 1)
    return payloads.capture(THING, turbine, "1.0.0", 1.7e9 + n, n, mc.FEATURES,
                            [[float(n)] * F for _ in range(rows)], errors, [1.0] * F,
                            "flagged" if flagged else "sampled", None)


def read_object(data: bytes) -> list[dict]:
    return [payloads.validate_capture(json.loads(line)) for line in gzip.decompress(data).splitlines()]


# ------------------------------------------------------------------ the detector's sampler
def offer(sampler, flagged, ends=None, turbine="gw1-t00", window=10):
    k = len(flagged)
    windows = np.arange(k * window * F, dtype=np.float64).reshape(k, window, F)
    errors = np.where(np.asarray(flagged)[:, None], 3.0, 0.2) * np.ones((k, F))
    ends = np.arange(k) * 10 + window - 1 if ends is None else np.asarray(ends)
    return sampler.offer(turbine, "1.0.0", mc.FEATURES, [1.0] * F, windows, ends, ends / 20.0, errors)


def test_every_flagged_window_and_a_fraction_of_normal_ones_are_captured():
    bus = MemoryBus()
    sampler = CaptureSampler(bus, THING, normal_fraction=0.05, max_per_minute=1e9, seed=1)
    flagged = np.zeros(20_000, dtype=bool)
    flagged[::100] = True  # 200 flagged
    offer(sampler, flagged)
    captured = bus.captures()
    reasons = [c["reason"] for c in captured]
    assert reasons.count("flagged") == 200 and all(c["anomaly"] for c in captured if c["reason"] == "flagged")
    assert 0.04 * 19_800 < reasons.count("sampled") < 0.06 * 19_800
    assert not any(c["anomaly"] for c in captured if c["reason"] == "sampled")
    assert sampler.counters["windows_captured"] == len(captured) and sampler.counters["capture_dropped"] == 0
    one = captured[0]
    assert payloads.validate_capture(one) and one["thing"] == THING and one["model_version"] == "1.0.0"
    assert np.asarray(one["rows"]).shape == (10, F)


def test_the_per_minute_bound_holds_in_an_alarm_storm_and_keeps_flagged_windows_first():
    bus, clock = MemoryBus(), Clock()
    sampler = CaptureSampler(bus, THING, normal_fraction=1.0, max_per_minute=10, clock=clock, seed=2)
    flagged = np.array([False] * 50 + [True] * 8 + [False] * 42)
    offer(sampler, flagged)
    assert [c["reason"] for c in bus.captures()].count("flagged") == 8  # all 8 alarms, then 2 normal
    assert len(bus.captures()) == 10 and sampler.counters["capture_dropped"] == 90
    offer(sampler, np.ones(100, dtype=bool))  # no time passed: nothing more
    assert len(bus.captures()) == 10 and sampler.counters["capture_dropped"] == 190
    clock.now += 30  # half a minute refills half the bucket
    offer(sampler, np.ones(100, dtype=bool))
    assert len(bus.captures()) == 15
    offer(sampler, np.ones(5, dtype=bool), turbine="gw1-t01")  # per turbine
    assert len(bus.captures()) == 20


def test_captured_windows_carry_labels_once_labels_arrive():
    bus = MemoryBus()
    sampler = CaptureSampler(bus, THING, normal_fraction=1.0, max_per_minute=1e9)
    offer(sampler, [False], ends=[99])
    assert bus.captures()[-1]["label"] is None  # no ground truth yet
    sampler.label("gw1-t00", 500, 600)  # samples 500..599
    # a 10-sample window ending at e covers e-9..e; the turbine's recovery after the episode
    # (payloads.LABEL_RECOVERY_SAMPLES) is no normal data either
    after = 600 + payloads.LABEL_RECOVERY_SAMPLES
    for end, label in ((400, 0), (499, 0), (500, 1), (599, 1), (608, 1), (after + 8, 1), (after + 9, 0)):
        offer(sampler, [False], ends=[end])
        assert bus.captures()[-1]["label"] == label, end
    offer(sampler, [False], ends=[550], turbine="gw1-t01")
    assert bus.captures()[-1]["label"] is None  # labels are per turbine


def test_capture_settings_from_the_recipe_configuration():
    assert detector_capture.settings({}) is None  # opt-in
    assert detector_capture.settings({"capture": True}) == {"normal_fraction": 0.02, "max_per_minute": 60.0}
    assert detector_capture.settings({"capture": "false"}) is None
    assert detector_capture.settings({"capture": True, "capture_normal_fraction": 0.5,
                                      "capture_max_per_minute": 6}) == {"normal_fraction": 0.5, "max_per_minute": 6.0}
    with pytest.raises(ValueError):
        detector_capture.settings({"capture": True, "capture_normal_fraction": 2})


def test_the_detector_publishes_the_raw_windows_it_scored_with_labels(model_dir, tmp_path):
    from windfleet.components.detector.model import load_model
    from windfleet.components.detector.service import Detector
    from windfleet.preprocessing import raw_features
    from windfleet.simulation import Turbine

    model = load_model(model_dir)
    bus = MemoryBus()
    det = Detector(bus, model, ["gw1-t00"], tmp_path, capture={"normal_fraction": 1.0, "max_per_minute": 1e9})
    det.subscribe()
    n = model.window + 4 * model.stride
    data = Turbine("gw1-t00", seed=3).step(n)
    columns = {f: np.asarray(data[f], dtype=np.float64) for f in payloads.SAMPLE_FIELDS}
    bus.publish(topics.labels("gw1-t00"), payloads.label("gw1-t00", "spike", n - 5, n, 1.0))
    bus.publish(topics.readings("gw1-t00"), payloads.readings_batch("gw1-t00", 0, columns))
    while det.score_available(timeout=0.1):
        pass
    captured = bus.captures()
    assert len(captured) == 5 and det.snapshot()["windows_captured"] == 5
    table = np.column_stack([np.asarray(columns[f], dtype=np.float64) for f in payloads.SAMPLE_FIELDS])
    raw = raw_features({f: table[:, j] for j, f in enumerate(payloads.SAMPLE_FIELDS)})
    for c in captured:
        end = c["window_end_seq"]
        assert np.allclose(c["rows"], raw[end - model.window + 1:end + 1])  # before prepare()
        assert c["label"] == (1 if end >= n - 5 else 0)
        assert c["model_version"] == model.version


# ------------------------------------------------------------------ the forwarder's capture spool
def test_capture_spool_drops_oldest_normal_windows_first_then_oldest_flagged(tmp_path):
    size = len(payloads.encode(window_record(0)))
    spool = CaptureSpool(tmp_path / "capture.sqlite", max_bytes=int(size * 6.5))  # room for 6
    for n in range(4):
        spool.add(payloads.encode(window_record(n, flagged=n % 2 == 1)), flagged=n % 2 == 1)  # 0 N, 1 F, 2 N, 3 F
    assert spool.add(payloads.encode(window_record(4)), False) == 0
    assert spool.add(payloads.encode(window_record(5, flagged=True)), True) == 0
    assert spool.add(payloads.encode(window_record(6)), False) == 1  # the oldest normal: 0
    assert spool.add(payloads.encode(window_record(7)), False) == 1  # then 2
    assert spool.add(payloads.encode(window_record(8)), False) == 1  # then 4
    assert spool.add(payloads.encode(window_record(9, flagged=True)), True) == 1  # then 6
    assert spool.add(payloads.encode(window_record(10, flagged=True)), True) == 1  # then 7
    assert spool.add(payloads.encode(window_record(11, flagged=True)), True) == 1  # then 8: none normal left
    assert spool.add(payloads.encode(window_record(12, flagged=True)), True) == 1  # the oldest flagged: 1
    assert spool.counters()["dropped_normal"] == 6 and spool.counters()["dropped_flagged"] == 1
    spool.close()
    spool = CaptureSpool(tmp_path / "capture.sqlite", max_bytes=int(size * 6.5))  # persisted
    obj = spool.build(THING, "captures/", 100, now=1_767_225_600.5)
    assert [r["window_end_seq"] for r in read_object(obj.data)] == [3, 5, 9, 10, 11, 12]
    assert obj.key == "captures/gw1/2026/01/01/1767225600500-1.jsonl.gz" and spool.windows == 0
    assert spool.dropped == 7 and spool.bytes <= spool.max_bytes
    spool.close()


def test_an_object_stays_until_s3_accepts_it_and_is_retried_with_the_same_key(tmp_path):
    spool = CaptureSpool(tmp_path / "capture.sqlite")
    for n in range(5):
        spool.add(payloads.encode(window_record(n)), False)

    class Flaky:
        def __init__(self):
            self.calls, self.stored = 0, {}

        def put_object(self, Bucket, Key, Body, **_):
            self.calls += 1
            if self.calls <= 2:
                raise ConnectionError("S3 unreachable")
            self.stored[Key] = Body

    s3 = Flaky()
    up = Uploader(spool, THING, "b", batch_windows=3, batch_interval=3600, client_factory=lambda: s3)
    keys = []
    for _ in range(2):
        with pytest.raises(ConnectionError):
            up.upload_once()
        keys.append(spool.head().key)
    spool.close()
    spool = CaptureSpool(tmp_path / "capture.sqlite")  # a restart in between
    up = Uploader(spool, THING, "b", batch_windows=3, batch_interval=3600, client_factory=lambda: s3)
    assert spool.head().key == keys[0] == keys[1]
    assert up.upload_once() and list(s3.stored) == keys[:1]
    assert not up.upload_once()  # 2 waiting < batch_windows, not due yet
    assert [r["window_end_seq"] for r in read_object(s3.stored[keys[0]])] == [0, 1, 2]
    assert spool.counters()["uploaded_windows"] == 3 and spool.counters()["uploaded_objects"] == 1
    spool.close()


def test_forwarder_uploads_batches_to_s3_with_moto_and_forwards_drift(tmp_path, monkeypatch):
    fake_aws_env(monkeypatch, "eu-west-1")
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(Bucket="captures-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        bus = MemoryBus(config={"turbines": 1, "capture_bucket": "captures-bucket", "capture_batch_windows": 4,
                                "capture_batch_interval_s": 3600, "delivery": "nucleus"})
        spool = Spool(tmp_path / "spool.sqlite")
        fwd = Forwarder(bus, spool, batch_interval=0.05, health_interval=3600,
                        capture_spool=CaptureSpool(tmp_path / "capture.sqlite"),
                        s3_client_factory=lambda: boto3.client("s3", region_name="eu-west-1"))
        fwd.start()
        try:
            for n in range(9):
                bus.publish(topics.capture(THING), window_record(n, flagged=n == 4))
            bus.publish(topics.capture(THING), {**window_record(99), "thing": "gw2"})  # not this gateway's
            drift = payloads.drift("gw1-t00", "1.0.0", 1.7e9, 500, {"rps": 0.4}, {"rps": 0.2})
            bus.publish(topics.drift("gw1-t00"), drift)

            def objects():
                return s3.list_objects_v2(Bucket="captures-bucket", Prefix="captures/").get("Contents", [])
            wait_until(lambda: len(objects()) == 2, 20, message="two batches of 4 uploaded")
            keys = sorted(o["Key"] for o in objects())
            assert all(KEY.match(k) for k in keys), keys
            records = [r for k in keys for r in read_object(s3.get_object(Bucket="captures-bucket",
                                                                          Key=k)["Body"].read())]
            assert sorted(r["window_end_seq"] for r in records) == list(range(8))
            assert next(r for r in records if r["window_end_seq"] == 4)["reason"] == "flagged"
            counters = fwd.health_counters()
            assert counters["captured"] == 9 and counters["capture_uploaded_windows"] == 8
            assert counters["capture_uploaded_objects"] == 2 and counters["capture_spooled"] == 1
            assert fwd.malformed_by_kind["capture:thing_mismatch"] == 1
        finally:
            fwd.stop()
        # stopping flushes the partial batch
        assert len(s3.list_objects_v2(Bucket="captures-bucket", Prefix="captures/")["Contents"]) == 3
        assert fwd.capture_spool.windows == 0


def test_drift_is_forwarded_as_a_telemetry_record(tmp_path):
    sent = []
    bus = MemoryBus(config={"turbines": 1, "delivery": "nucleus"})
    bus.publish_cloud = lambda topic, payload, qos=1: sent.append(payloads.decode(payload)) or True
    fwd = Forwarder(bus, Spool(tmp_path / "spool.sqlite"), batch_interval=0.05, health_interval=3600).start()
    try:
        good = payloads.drift("gw1-t00", "1.0.0", 1.7e9, 500, {"rps": 0.4}, {"rps": 0.2})
        bus.publish(topics.drift("gw1-t00"), good)
        bus.publish(topics.drift("gw1-t00"), {**good, "turbine_id": "gw1-t05"})
        wait_until(lambda: any(r["type"] == "drift" for m in sent for r in m["records"]), 10, message="drift sent")
        drift = [r["body"] for m in sent for r in m["records"] if r["type"] == "drift"]
        assert drift == [good] and fwd.malformed_by_kind["turbine_mismatch"] == 1
    finally:
        fwd.stop()


# ------------------------------------------------------------------ the local S3 endpoint
def test_local_s3_endpoint_accepts_only_credentials_the_token_exchange_service_issued(tmp_path):
    endpoint = S3Endpoint(tmp_path / "home").start()
    try:
        good = CredentialAuthority(tmp_path / "home").issue()
        s3 = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1",
                          aws_access_key_id=good["AccessKeyId"], aws_secret_access_key=good["SecretAccessKey"],
                          aws_session_token=good["Token"])
        s3.put_object(Bucket=BUCKET, Key="captures/x/a b.jsonl.gz", Body=b"\x1f\x8bdata")
        assert s3.get_object(Bucket=BUCKET, Key="captures/x/a b.jsonl.gz")["Body"].read() == b"\x1f\x8bdata"
        assert s3.head_object(Bucket=BUCKET, Key="captures/x/a b.jsonl.gz")["ContentLength"] == 6
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="captures/",
                                                             PaginationConfig={"PageSize": 1})
        assert [o["Key"] for p in pages for o in p.get("Contents", [])] == ["captures/x/a b.jsonl.gz"]
        # what the local backend reads is what was put
        assert (tmp_path / "home" / "s3" / BUCKET / "captures" / "x" / "a b.jsonl.gz").read_bytes() == b"\x1f\x8bdata"
        foreign = CredentialAuthority(tmp_path / "another-home").issue()  # another nucleus' key
        for creds, code in (
                (("AKIAEXAMPLE", "x", None), "InvalidAccessKeyId"),
                ((good["AccessKeyId"], "forged", good["Token"]), "SignatureDoesNotMatch"),
                ((foreign["AccessKeyId"], foreign["SecretAccessKey"], foreign["Token"]), "SignatureDoesNotMatch")):
            creds = dict(zip(("aws_access_key_id", "aws_secret_access_key", "aws_session_token"), creds))
            other = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1", **creds)
            with pytest.raises(ClientError) as err:
                other.put_object(Bucket=BUCKET, Key="captures/x/evil", Body=b"x")
            assert err.value.response["Error"]["Code"] == code
        assert not (tmp_path / "home" / "s3" / BUCKET / "captures" / "x" / "evil").exists()
    finally:
        endpoint.close()


def test_token_exchange_service_answers_its_components_only(tmp_path):
    import urllib.error
    import urllib.request

    from windfleet.nucleus.tes import TokenExchangeServer

    tes = TokenExchangeServer(CredentialAuthority(tmp_path / "home"), {"svcuid-1": FWD}.get).start()
    try:
        def get(token, path=""):
            request = urllib.request.Request(tes.uri + path, headers={"Authorization": token} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, None

        status, creds = get("svcuid-1")
        assert status == 200 and set(creds) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
        assert get("svcuid-1")[1] == creds  # cached until it nears expiry
        assert CredentialAuthority(tmp_path / "home").secret_for(creds["AccessKeyId"], creds["Token"]) == \
            creds["SecretAccessKey"]
        assert [get("someone-else")[0], get(None)[0], get("svcuid-1", "x")[0]] == [403, 400, 404]
    finally:
        tes.close()


# ------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def forwarder_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("capture-build")
    return out, build(out, components=[FWD])[FWD]


class HeldEndpoint(S3Endpoint):
    """An S3 endpoint that can hold uploads in flight (to kill the forwarder mid-upload)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold, self.arrived, self.release = threading.Event(), threading.Event(), threading.Event()

    def dispatch(self, method, raw_path, headers, body):
        if method == "PUT" and self.hold.is_set():
            self.arrived.set()
            self.release.wait(30)
        return super().dispatch(method, raw_path, headers, body)


def stored_windows(home) -> list[int]:
    root = home / "s3" / BUCKET / "captures" / THING
    return sorted(r["window_end_seq"] for p in root.rglob("*.jsonl.gz") for r in read_object(p.read_bytes()))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_forwarder_uploads_through_the_token_exchange_service_and_loses_nothing(tmp_path, monkeypatch,
                                                                                forwarder_build):
    home = tmp_path / "home"
    monkeypatch.setenv("WINDFLEET_HOME", str(home))  # the nucleus' TES and the endpoint share its key
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "not-these")  # keys of this shell: the endpoint would refuse them
    endpoint = HeldEndpoint(home).start()
    port = int(endpoint.url.rsplit(":", 1)[1])
    nucleus = Nucleus(THING, tmp_path / "device")
    try:
        build_dir, version = forwarder_build
        nucleus.deploy(build_dir, {FWD: version}, {FWD: {"MERGE": {
            "turbines": 1, "health_interval_s": 0.5, "capture_endpoint": endpoint.url, "capture_batch_windows": 5,
            "capture_batch_interval_s": 0.3, "delivery": "nucleus"}}})
        detector = nucleus.publisher(DET, recipe_access_control(DET))
        health = nucleus.watcher(topics.health(THING))

        def counters():
            bodies = [json.loads(d) for _, d, _ in health.snapshot()]
            bodies = [b for b in bodies if b["component"] == FWD]
            return bodies[-1]["counters"] if bodies else {}

        wait_until(counters, 60, message="the forwarder's health")
        env = nucleus.runtime.components[FWD].env
        assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == nucleus.runtime.tes.uri
        assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] == nucleus.runtime.svcuids[FWD]

        def publish(numbers):
            for n in numbers:
                detector.publish(topics.capture(THING), payloads.encode(window_record(n, flagged=n % 7 == 0)))

        # 1. through TES to the local endpoint (the shell's own AWS keys never reach the component)
        publish(range(0, 12))
        wait_until(lambda: stored_windows(home) == list(range(12)), 30, message="12 windows in the local S3")
        assert nucleus.runtime.tes.requests >= 1 and endpoint.counters["objects_put"] >= 3

        # 2. S3 down, then up: nothing lost
        endpoint.close()
        publish(range(12, 24))
        wait_until(lambda: counters().get("capture_upload_errors", 0) >= 1, 30, message="uploads failing")
        endpoint = HeldEndpoint(home, port=port).start()
        wait_until(lambda: stored_windows(home) == list(range(24)), 60, message="24 windows after S3 came back")

        # 3. kill -9 in the middle of an upload: what the forwarder acknowledged arrives once
        endpoint.hold.set()
        publish(range(24, 36))
        assert endpoint.arrived.wait(30), "no upload reached the endpoint"
        wait_until(lambda: counters().get("captured", 0) >= 36, 30, message="all 12 windows spooled")
        pid = nucleus.kill9(FWD)
        endpoint.hold.clear()
        endpoint.release.set()
        nucleus.wait_restarted(FWD, pid)
        wait_until(lambda: stored_windows(home) == list(range(36)), 60, message="36 windows after kill -9")
        assert counters().get("capture_dropped", 0) == 0
    finally:
        nucleus.stop()
        endpoint.close()
