"""Fuzzing the cloud ingest (``TelemetryStore.ingest``): arbitrary telemetry never raises,
every message gets exactly one outcome and every outcome is counted, every record of a
stored message is either stored or counted as a malformed record, and a valid stream
interleaved with the junk is stored whole (no loss, no gap).

Payloads: 10,000 by default, ``FUZZ_BATCH`` per hypothesis example; ``pytest --fuzz-examples N``
or ``WINDFLEET_FUZZ_EXAMPLES=N`` change it (see tests/conftest.py).
"""

from __future__ import annotations

import collections
import json
import math
import time
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from windfleet import payloads
from windfleet.cloud.ingest import DUPLICATE, STALE, STORED, TelemetryStore, log_events
from windfleet.model_contract import FEATURES

from tests.conftest import FUZZ_BATCH

pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]

THING = "gwf"          # the thing the fuzzer mostly impersonates
GOOD = "gwgood"        # a well-behaved device publishing between the fuzzed messages
NOW = time.time()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
# Field-level junk is drawn from a fixed list (cheap to draw: 10,000 examples stay quick);
# the values are the ones that break naive code: wrong types, empty, huge, non-finite.
JUNK = [None, True, False, 0, -1, 2**31, 2**53, 2**63, 2**64, 10**30, 10**400, 1e308, -1e308, 5e-324,
        float("inf"), float("nan"), "", "x", "1.0", "../etc", "\u0000", [], [1], {}, {"a": 1}, {"rps": "x"},
        [{"type": "score"}]]
junk = st.sampled_from(JUNK)
numbers = st.one_of(st.floats(-1e6, 1e6), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-(2**70), 2**70), junk)
turbines = st.sampled_from([f"{THING}-t00", f"{THING}-t01"])
foreign_turbines = st.sampled_from([f"{GOOD}-t00", "../etc-t00", f"{THING}-" + "x" * 200] + JUNK)


def _often(draw, valid, junk_strategy=None):
    """A valid value 7 times out of 8, else junk: most messages get deep into the ingest.
    (Hypothesis favours the smallest choice, 0: it is the valid one, here and below.)"""
    return draw(valid) if draw(st.integers(0, 7)) < 7 else draw(junk if junk_strategy is None else junk_strategy)


def _picker(draw):
    """``o(valid[, junk])``: for half the objects always the valid value (so the ingest's
    deeper paths, storing, are fuzzed too), for the other half :func:`_often`."""
    clean = not draw(st.booleans())

    def o(valid, junk_strategy=None):
        return draw(valid) if clean else _often(draw, valid, junk_strategy)

    o.clean = clean
    return o


def _maybe(draw, obj: dict) -> dict:
    """Sometimes drop a key or add a junk one."""
    if draw(st.integers(0, 9)) == 9:
        obj.pop(draw(st.sampled_from(sorted(obj))), None)
    if draw(st.integers(0, 9)) == 9:
        obj[draw(st.sampled_from(["extra", "schema_version", "records", "body", "ts"]))] = draw(junk)
    return obj


@st.composite
def score_like(draw) -> dict:
    o = _picker(draw)
    feats = draw(st.lists(st.sampled_from(FEATURES), min_size=0, max_size=len(FEATURES), unique=True))
    ok_numbers = st.floats(0, 10)
    body = {
        "schema_version": 1, "turbine_id": o(turbines, foreign_turbines), "ts": o(st.just(NOW), numbers),
        "model_version": o(st.just("1.0.0")),
        "window_end_seq": o(st.integers(0, 10**6), st.one_of(st.integers(-5, 2**65), junk)),
        "feature_errors": o(st.fixed_dictionaries({f: ok_numbers for f in feats}),
                            st.one_of(st.fixed_dictionaries({f: numbers for f in feats}), junk)),
        "thresholds": o(st.fixed_dictionaries({f: ok_numbers for f in feats}),
                        st.one_of(st.fixed_dictionaries({f: numbers for f in feats}), junk)),
        "anomalous_features": o(st.lists(st.sampled_from(FEATURES), max_size=3)),
        "anomaly": o(st.booleans()),
        "score": o(ok_numbers, numbers),
    }
    return body if o.clean else _maybe(draw, body)


@st.composite
def health_like(draw) -> dict:
    o = _picker(draw)
    body = {
        "schema_version": 1, "thing": o(st.just(THING), st.one_of(st.just(GOOD), junk)),
        "component": o(st.just("com.windfleet.AnomalyDetector")),
        "version": o(st.just("1.0.0")),
        "state": o(st.sampled_from(payloads.STATES)),
        "ts": o(st.just(NOW), numbers),
        "counters": o(st.dictionaries(st.text(max_size=6), numbers, max_size=3)),
        "model_version": o(st.just("1.0.0")),
        "reason": o(st.text(max_size=20)),
    }
    return body if o.clean else _maybe(draw, body)


@st.composite
def log_like(draw) -> dict:
    o = _picker(draw)
    body = {"schema_version": 1, "thing": THING, "component": o(st.just("c")),
            "level": o(st.sampled_from(["INFO", "WARNING"])),
            "message": o(st.text(max_size=20)), "ts": o(st.just(NOW), numbers)}
    return body if o.clean else _maybe(draw, body)


BODIES = {"score": score_like(), "health": health_like(), "log": log_like()}


@st.composite
def record_like(draw):
    o = _picker(draw)
    kind = o(st.sampled_from(sorted(BODIES)))
    body = draw(BODIES[kind]) if isinstance(kind, str) and kind in BODIES else draw(st.one_of(*BODIES.values()))
    if draw(st.integers(0, 9)) == 9:
        body = draw(st.one_of(*BODIES.values(), junk))  # a body of another kind, or no object at all
    return {"type": kind, "body": body} if draw(st.integers(0, 19)) < 19 else draw(junk)


@st.composite
def telemetry_like(draw) -> dict:
    o = _picker(draw)
    obj = {
        "schema_version": o(st.just(1)),
        "thing": o(st.just(THING), st.one_of(st.just("../etc"), junk)),
        "seq": o(st.integers(0, 2**40), st.one_of(st.integers(-3, 2**66), junk)),
        "ts": o(st.just(NOW), numbers),
        "records": o(st.lists(record_like(), max_size=4)),
    }
    if type(obj["seq"]) is int and 0 <= obj["seq"] < 2**40:
        # Hypothesis favours small numbers: spread them by the content, or most would be duplicates.
        obj["seq"] += zlib.crc32(json.dumps(obj["records"], sort_keys=True, default=str).encode()) << 8
    return obj if o.clean else _maybe(draw, obj)


def _encode(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN/Infinity tokens included: what a broken sender writes


@st.composite
def payload_strategy(draw) -> bytes | str:
    """Most examples telemetry-shaped (so they reach the records), the rest raw junk."""
    branch = draw(st.integers(0, 9))
    if branch <= 5:
        return _encode(draw(telemetry_like()))
    if branch == 6:
        raw = _encode(draw(telemetry_like()))
        return raw[: draw(st.integers(0, len(raw)))]  # cut short
    if branch == 7:
        return draw(st.binary(max_size=400))
    if branch == 8:
        return draw(st.text(max_size=200))  # ingest also takes str (lone surrogates included)
    return _encode(draw(json_values))


def _telemetry(thing: str, seq: int, records: list) -> bytes:
    return _encode({"schema_version": 1, "thing": thing, "seq": seq, "ts": NOW, "records": records})


def _score_body(turbine: str, **changes) -> dict:
    body = payloads.score(turbine, NOW, "1.0.0", 10, {f: 0.5 for f in FEATURES}, {f: 1.0 for f in FEATURES})
    body.update(changes)
    return body


# Inputs that once raised out of ingest (TypeError, OverflowError, RecursionError,
# UnicodeEncodeError) instead of being counted: hypothesis runs these every time.
KNOWN = [
    b"[" * 100_000,
    "\ud800",
    _telemetry(THING, 2**63, []),
    _telemetry(THING, 0, [{"type": "score", "body": _score_body(f"{THING}-t00", window_end_seq=2**64)}]),
    _telemetry(THING, 1, [{"type": "score", "body": _score_body(f"{THING}-t00", ts=10**400)}]),
    _telemetry(THING, 2, [{"type": "score", "body": _score_body(f"{THING}-t00", score=10**30)}]),
    _telemetry(THING, 3, [{"type": "score", "body": _score_body(f"{THING}-t00", score=None,
                                                              thresholds={"rps": "high"})}]),
    _telemetry(THING, 4, [{"type": "health", "body": payloads.health(THING, "c", "1", "RUNNING", 1.0, {})
                           | {"ts": 10**400}}]),
    _telemetry(THING, 5, [{"type": "log", "body": {"ts": 10**400, "message": "x"}}]),
    _telemetry(THING, 6, [{"type": "log", "body": {"ts": 1.0, "message": "x"}}]).replace(b'"ts": 1.0', b'"ts": 1e400'),
    _telemetry(THING, 7, [{"type": "score", "body": _score_body(f"{THING}-t00", anomalous_features=True)}]),
]


def test_fuzzed_telemetry_never_raises_and_every_message_and_record_is_counted(tmp_path, fuzz_examples):
    store = TelemetryStore(tmp_path / "telemetry.sqlite")
    outcomes: collections.Counter = collections.Counter()
    expect = {"records_of_stored": 0, "good_seq": 0}

    def good_message() -> bytes:
        seq = expect["good_seq"]
        expect["good_seq"] += 1
        return payloads.encode(payloads.telemetry(GOOD, seq, NOW + seq, [
            {"type": "score", "body": payloads.score(f"{GOOD}-t00", NOW + seq, "1.0.0", 100 + 10 * seq,
                                                     {f: 0.5 for f in FEATURES}, {f: 1.0 for f in FEATURES})}]))

    def feed(raw) -> None:
        outcome = store.ingest(raw)  # must not raise
        try:  # the AWS side formats the same messages: it must not raise either
            msg = payloads.validate_telemetry(payloads.decode(raw))
        except payloads.MalformedPayload:
            pass
        else:
            for event in log_events(msg):
                assert math.isfinite(event["ts"]), event  # the Lambda multiplies it into an int
                assert event["body"].get("kind") != "invalid", event  # no unforeseen exception
                json.dumps(event["body"], default=str)
        assert outcome in (STORED, DUPLICATE, STALE) or outcome.startswith("malformed:"), outcome
        outcomes[outcome] += 1
        if outcome == STORED:
            expect["records_of_stored"] += len(json.loads(raw)["records"])
        assert store.ingest(good_message()) == STORED  # the store keeps working for everyone else

    @settings(max_examples=-(-fuzz_examples // FUZZ_BATCH), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(payload_strategy(), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
    @example(batch=KNOWN)  # run every time, before hypothesis' own examples
    def check(batch):
        for raw in batch:
            feed(raw)

    check()
    n = sum(outcomes.values())
    assert n >= fuzz_examples, "hypothesis fed every payload asked for"
    # every drop has a named reason: none came from an exception the validators did not foresee
    assert "malformed:invalid" not in outcomes, outcomes
    assert outcomes[STORED] > 0 and sum(v for k, v in outcomes.items() if k.startswith("malformed:")) > 0
    counters = store.counters()
    assert counters["messages_in"] == n + expect["good_seq"]
    for outcome, count in outcomes.items():
        if outcome.startswith("malformed:"):
            assert counters[outcome] == count, outcome
    assert sum(v for k, v in counters.items() if k.startswith("malformed:")) == \
        sum(v for k, v in outcomes.items() if k.startswith("malformed:"))
    assert counters.get("duplicates", 0) == outcomes[DUPLICATE]
    assert counters.get("stale", 0) == outcomes[STALE]
    # every record of every stored message: stored (records:<type>) or counted as malformed
    per_record = sum(v for k, v in counters.items() if k.startswith(("records:", "malformed_record:")))
    assert per_record == expect["records_of_stored"] + expect["good_seq"]
    stored_fuzz = sum(v["received"] for t, v in store.loss().items() if t != GOOD)
    assert stored_fuzz == outcomes[STORED]
    # the well-behaved device lost nothing
    assert store.loss(GOOD)[GOOD] == {"received": expect["good_seq"], "expected": expect["good_seq"], "lost": 0,
                                      "duplicates": 0, "stale": 0, "first_seq": 0,
                                      "max_seq": expect["good_seq"] - 1}
    assert len(store.turbine_scores(f"{GOOD}-t00", limit=10**6)["ts"]) == expect["good_seq"]
    # the store's reads still work over whatever was stored
    fleet = store.fleet()
    assert {g["thing"] for g in fleet["gateways"]} >= {GOOD}
    for g in fleet["gateways"]:
        for t in g["turbines"]:
            store.turbine_scores(t["turbine_id"])
    store.anomalies()
    store.logs()
    print(f"ingest fuzz: {n} messages, outcomes {dict(outcomes.most_common())}, counters {counters}")
    store.close()


def test_an_unforeseen_error_costs_its_message_only_not_the_batch(tmp_path, monkeypatch):
    """The safety net under the validators: one message raising something unexpected in
    a batch is rolled back alone, counted as ``malformed:invalid``, and its neighbours
    (before and after it, in the same transaction) are stored with their summaries."""
    store = TelemetryStore(tmp_path / "telemetry.sqlite")
    real = TelemetryStore._score

    def flaky(self, conn, thing, body, batch):
        if body["window_end_seq"] == 666:
            real(self, conn, thing, body, batch)  # its row is written, then the message fails
            raise TypeError("unforeseen")
        return real(self, conn, thing, body, batch)

    monkeypatch.setattr(TelemetryStore, "_score", flaky)

    def msg(seq: int, end: int) -> bytes:
        return _telemetry(THING, seq, [{"type": "score", "body": _score_body(f"{THING}-t00", window_end_seq=end,
                                                                             ts=NOW + seq)}])

    out = store.ingest_many([msg(0, 10), msg(1, 666), msg(2, 30)])
    assert out == [STORED, "malformed:invalid", STORED]
    counters = store.counters()
    assert counters["malformed:invalid"] == 1 and counters["messages_in"] == 3
    assert counters["records:score"] == 2
    series = store.turbine_scores(f"{THING}-t00")
    assert len(series["ts"]) == 2, "the failed message's row was rolled back"
    turbine = store.fleet()["gateways"][0]["turbines"][0]
    assert turbine["n_scores"] == 2, "its summary too"
    assert store.loss(THING)[THING]["received"] == 2
    assert store.ingest(msg(1, 667)) == STORED  # sent again (fixed): fills the gap
    assert store.loss(THING)[THING]["lost"] == 0
    store.close()
