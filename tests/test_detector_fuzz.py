"""Fuzzing the detector's readings handler: arbitrary payloads never raise, every
message is either used or counted as dropped, and nothing unencodable is published.

Payloads: 10,000 by default (the fault suite's figure), ``FUZZ_BATCH`` per hypothesis
example; ``pytest --fuzz-examples N`` or ``WINDFLEET_FUZZ_EXAMPLES=N`` change it (see
tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from windfleet import payloads, topics

from tests.conftest import FUZZ_BATCH
from tests.detector_fixtures import FIELDS, THING, make_detector, messages, simulate_stream
from tests.detector_fixtures import build_model_package

TID = f"{THING}-t00"


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


field_values = st.one_of(st.floats(-1e6, 1e6), st.floats(allow_nan=True, allow_infinity=True),
                         st.floats(min_value=-1e308, max_value=1e308), scalars)


@st.composite
def sample_like(draw) -> dict:
    sample = {f: draw(field_values) for f in FIELDS if draw(st.integers(0, 19)) > 0}
    if draw(st.integers(0, 9)) == 0:
        sample.update(draw(st.dictionaries(st.text(max_size=6), scalars, max_size=2)))
    return sample


@st.composite
def readings_like(draw) -> dict:
    obj = {
        "schema_version": draw(st.one_of(st.just(1), json_values)),
        "turbine_id": draw(st.one_of(st.just(TID), st.just(f"{THING}-t01"), json_values)),
        "seq": draw(st.one_of(st.integers(0, 5000), st.integers(-5, 2**64), json_values)),
        "samples": draw(st.one_of(st.lists(sample_like(), min_size=1, max_size=4), json_values)),
    }
    for key in draw(st.lists(st.sampled_from(list(obj)), max_size=2)):
        obj.pop(key, None)
    return obj


def _encode(obj) -> bytes:
    # json.dumps writes NaN/Infinity tokens: exactly what a broken publisher might send.
    return json.dumps(obj).encode()


payload_strategy = st.one_of(
    st.binary(max_size=600),
    json_values.map(_encode),
    readings_like().map(_encode),
    st.tuples(readings_like().map(_encode), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
)


def _reading(**changes) -> bytes:
    sample = dict.fromkeys(FIELDS, 1.0)
    sample.update(changes.pop("sample", {}))
    return _encode({"schema_version": 1, "turbine_id": TID, "seq": 0, "samples": [sample], **changes})


# Inputs that once escaped as an unforeseen exception (counted only as "invalid"):
# hypothesis runs these every time, before its own examples.
KNOWN = [
    b"[" * 100_000,                          # RecursionError in json.loads
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    _reading(sample={"rps": 10**400}),        # OverflowError converting to float
    _reading(seq=2**63),                     # beyond every consumer's integer range
    _reading(seq=2**53 - 1, samples=[dict.fromkeys(FIELDS, 1.0)] * 2),
]


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    return build_model_package(tmp_path_factory.mktemp("fuzz") / "m", "1.0.0")


@pytest.mark.fault
def test_fuzzed_payloads_never_raise_and_every_drop_is_counted(fuzz_model, tmp_path, fuzz_examples):
    det, bus = make_detector(fuzz_model, tmp_path, turbines=[TID])
    good = messages(TID, simulate_stream(TID, 5000))
    seen = {"n": 0, "used": 0}

    def feed(payload: bytes) -> None:
        before = det.snapshot()
        det.handle(topics.readings(TID), payload)  # must not raise
        after = det.snapshot()
        used = after["readings_received"] > before["readings_received"]
        dropped = after["malformed_dropped"] - before["malformed_dropped"]
        assert (used, dropped) in ((True, 0), (False, 1)), (payload[:200], before, after)
        seen["used"] += used
        # keep a valid stream flowing too, and score: scoring fuzzed-but-valid windows must
        # publish only encodable scores (FakeBus.publish refuses NaN)
        det.handle(topics.readings(TID), good[seen["n"] % len(good)])
        seen["n"] += 1
        if seen["n"] % 50 == 0:
            while det.score_available(timeout=0):
                pass

    @settings(max_examples=-(-fuzz_examples // FUZZ_BATCH), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(payload_strategy, min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
    @example(batch=KNOWN)  # run every time, before hypothesis' own examples
    def check(batch):
        for payload in batch:
            feed(payload)

    check()
    while det.score_available(timeout=0):
        pass
    c = det.snapshot()
    assert seen["n"] >= fuzz_examples, "hypothesis fed every payload asked for"
    assert c["messages_received"] == 2 * seen["n"]
    assert c["malformed_dropped"] == sum(det.malformed.values())
    # every drop has a named reason: none came from an exception the validators did not foresee
    assert "invalid" not in det.malformed, det.malformed
    assert det.malformed.get("too_deep", 0) >= 2 and det.malformed.get("out_of_range", 0) >= 3
    assert c["malformed_dropped"] == seen["n"] - seen["used"]
    assert c["queue_dropped"] == 0 and c["publish_errors"] == 0
    assert c["windows_scored"] > 0
    for s in bus.scores():
        payloads.validate_score(s)
