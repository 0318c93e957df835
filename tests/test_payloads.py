"""The payload contract's validators: every bad input is a MalformedPayload with a
countable kind, never another exception (which consumers could only count as "invalid")."""

from __future__ import annotations

import json

import pytest

from windfleet import payloads

SAMPLE = dict.fromkeys(payloads.SAMPLE_FIELDS, 1.0)


def readings(**changes) -> dict:
    return {"schema_version": 1, "turbine_id": "gw1-t00", "seq": 0, "samples": [dict(SAMPLE)], **changes}


def kind_of(fn, *args) -> str:
    with pytest.raises(payloads.MalformedPayload) as info:
        fn(*args)
    assert str(info.value).startswith(info.value.kind) and info.value.detail, "a clear message"
    return info.value.kind


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "[" * 100_000])
def test_deeply_nested_json_is_malformed_not_a_recursion_error(raw):
    assert len(raw) < payloads.MAX_PAYLOAD_BYTES  # small enough to be parsed: the parser's depth is the limit
    assert kind_of(payloads.decode, raw) == "too_deep"


def test_nesting_a_payload_needs_still_decodes():
    obj = readings(extra=[[[[{"a": [1]}]]]])
    assert payloads.decode(json.dumps(obj)) == obj


def test_text_that_is_not_utf8_is_malformed_not_a_unicode_error():
    assert kind_of(payloads.decode, '{"schema_version": 1, "x": "\ud800"}') == "not_json"
    assert kind_of(payloads.decode, b'{"schema_version": 1, "x": "\xff"}') == "not_json"


@pytest.mark.parametrize("value", [10**400, -(10**309), 2**1024])
def test_an_integer_beyond_float64_is_out_of_range_not_an_overflow_error(value):
    obj = payloads.decode(json.dumps(readings(samples=[{**SAMPLE, "rps": value}])))
    assert kind_of(payloads.validate_readings, obj) == "out_of_range"
    score = payloads.score("gw1-t00", 1.0, "1", 10, {"rps": 0.1}, {"rps": 1.0})
    assert kind_of(payloads.validate_score, {**score, "ts": value}) == "out_of_range"
    assert kind_of(payloads.validate_score, {**score, "feature_errors": {"rps": value}}) == "out_of_range"


def test_1e400_written_as_a_float_is_non_finite():
    obj = payloads.decode(b'{"schema_version": 1, "turbine_id": "gw1-t00", "seq": 0, "samples": [{"ts": 1e400, '
                          b'"rps": 1, "wind_speed_rps": 1, "voltage": 1, "qw": 1, "qx": 0, "qy": 0, "qz": 0}]}')
    assert kind_of(payloads.validate_readings, obj) == "non_finite"


def test_sequence_numbers_are_bounded_to_what_every_consumer_reads_exactly():
    assert payloads.validate_readings(readings(seq=payloads.MAX_INT))["seq"] == payloads.MAX_INT
    assert kind_of(payloads.validate_readings, readings(seq=payloads.MAX_INT + 1)) == "out_of_range"
    # the last sample's seq becomes a window_end_seq: it must fit too
    assert kind_of(payloads.validate_readings, readings(seq=payloads.MAX_INT, samples=[dict(SAMPLE)] * 2)) \
        == "out_of_range"
    assert kind_of(payloads.validate_telemetry, {"schema_version": 1, "thing": "gw1", "seq": 2**63,
                                                 "records": []}) == "out_of_range"
    assert kind_of(payloads.validate_readings, readings(seq=-1)) == "wrong_type"


def test_optional_score_fields_are_checked_when_present():
    score = payloads.score("gw1-t00", 1.0, "1", 10, {"rps": 0.1}, {"rps": 1.0})
    assert payloads.validate_score(dict(score)) == score
    without = {k: v for k, v in score.items() if k not in ("score", "thresholds")}
    assert payloads.validate_score(dict(without)) == without
    assert kind_of(payloads.validate_score, {**score, "thresholds": {"rps": "high"}}) == "wrong_type"
    assert kind_of(payloads.validate_score, {**score, "thresholds": [1.0]}) == "wrong_type"
    assert kind_of(payloads.validate_score, {**score, "score": 10**400}) == "out_of_range"
    assert kind_of(payloads.validate_score, {**score, "score": "1"}) == "wrong_type"


# ---------------------------------------------------------------- batched, columnar forms (version 2)
def columns(n: int = 3, **changes) -> dict:
    cols = {f: [float(i + j) for i in range(n)] for j, f in enumerate(payloads.SAMPLE_FIELDS)}
    return {"schema_version": 2, "turbine_id": "gw1-t00", "seq": 5, "columns": {**cols, **changes}}


def test_columnar_readings_give_the_same_table_as_per_sample_ones():
    new = payloads.decode(payloads.encode(columns()), payloads.BATCH_VERSIONS)
    old = readings(seq=5, samples=payloads.readings_samples(new))
    table = payloads.readings_table(new)
    assert table.shape == (3, len(payloads.SAMPLE_FIELDS)) and table.dtype == "float64"
    assert (table == payloads.readings_table(old)).all()
    assert payloads.validate_readings(new) is new
    # an older consumer (decode's default: version 1) refuses it by its version, not by a crash
    assert kind_of(payloads.decode, payloads.encode(new)) == "schema_version"


@pytest.mark.parametrize("changes, kind", [
    ({"rps": [1.0, True, 2.0]}, "wrong_type"),
    ({"rps": [1.0, None, 2.0]}, "wrong_type"),
    ({"rps": [1.0, "2", 2.0]}, "wrong_type"),
    ({"rps": [[1.0], 1.0, 2.0]}, "wrong_type"),
    ({"rps": []}, "wrong_type"),
    ({"rps": [1.0, 2.0]}, "length_mismatch"),
    ({"rps": [1.0, 10**400, 2.0]}, "out_of_range"),
])
def test_a_bad_column_is_named_by_kind(changes, kind):
    assert kind_of(payloads.readings_table, columns(**changes)) == kind


def test_whole_batch_checks_cover_the_envelope():
    no_voltage = columns()
    del no_voltage["columns"]["voltage"]
    assert kind_of(payloads.readings_table, no_voltage) == "missing_field"
    assert kind_of(payloads.readings_table, {**columns(), "columns": [1, 2]}) == "wrong_type"
    assert kind_of(payloads.readings_table, {**columns(), "seq": -1}) == "wrong_type"
    assert kind_of(payloads.readings_table, {**columns(), "seq": payloads.MAX_INT - 1}) == "out_of_range"
    raw = payloads.encode(columns(rps=[1.0, 123456.5, 2.0])).replace(b"123456.5", b"1e400")
    assert kind_of(payloads.readings_table, payloads.decode(raw, payloads.BATCH_VERSIONS)) == "non_finite"
    raw = payloads.encode(columns()).replace(b"[1.0,2.0,3.0]", b"[1.0,NaN,3.0]")
    assert kind_of(payloads.decode, raw, payloads.BATCH_VERSIONS) == "non_finite"


def test_a_score_batch_expands_to_exactly_the_per_window_scores():
    features, thresholds = ["rps", "voltage"], [1.0, 2.0]
    errors = [[0.5, 3.0], [0.25, 0.5]]
    batch = payloads.score_batch("gw1-t00", "1.2.0", features, thresholds, [99, 109], [1.5, 2.0], errors)
    got = payloads.score_records(payloads.validate_score_batch(payloads.decode(payloads.encode(batch), (2,))))
    assert got == [payloads.score("gw1-t00", ts, "1.2.0", end, dict(zip(features, e)), dict(zip(features, thresholds)))
                   for end, ts, e in ((99, 1.5, errors[0]), (109, 2.0, errors[1]))]
    assert [s["anomaly"] for s in got] == [True, False] and got[0]["score"] == 1.5
    for s in got:
        payloads.validate_score(s)


@pytest.mark.parametrize("changes, kind", [
    ({"ts": [1.0]}, "length_mismatch"),
    ({"thresholds": [1.0]}, "length_mismatch"),
    ({"thresholds": [1.0, 0.0]}, "out_of_range"),
    ({"window_end_seq": [99, -1]}, "wrong_type"),
    ({"window_end_seq": [99, 1.5]}, "wrong_type"),
    ({"feature_errors": [[0.5, 3.0], [0.25]]}, "wrong_type"),
    ({"feature_errors": [[0.5, 3.0], [0.25, "x"]]}, "wrong_type"),
    ({"features": ["rps", "rps"]}, "wrong_type"),
    ({"model_version": None}, "missing_field"),
])
def test_a_bad_score_batch_is_named_by_kind(changes, kind):
    batch = payloads.score_batch("gw1-t00", "1.2.0", ["rps", "voltage"], [1.0, 2.0], [99, 109], [1.5, 2.0],
                                 [[0.5, 3.0], [0.25, 0.5]])
    assert kind_of(payloads.validate_score_batch, {**batch, **changes}) == kind


def test_encode_refuses_nan_and_decode_matches_the_standard_library():
    with pytest.raises(ValueError):
        payloads.encode({"schema_version": 1, "x": float("nan")})
    obj = {"schema_version": 1, "a": [0.1, 1e22, 5e-324, -0.0, 2**63 - 1], "b": None, "c": "\u00e9"}
    assert json.loads(payloads.encode(obj)) == obj and payloads.decode(payloads.encode(obj)) == obj
    big = b'{"schema_version": 1, "turbine_id": "gw1-t00", "seq": ' + b"9" * 30 + b', "samples": []}'
    assert kind_of(payloads.validate_readings, payloads.decode(big)) == "out_of_range"  # an int, as json reads it


def _verdict(raw, validate, versions=(1,)):
    """What a consumer concludes from ``raw``: the validated object, or the drop's kind."""
    try:
        return validate(payloads.decode(raw, versions))
    except payloads.MalformedPayload as exc:
        return exc.kind


_BATCH = payloads.readings_batch("gw1-t00", 7, {f: [1.0, 2.0] for f in payloads.SAMPLE_FIELDS})
FALLBACK_CORPUS = [
    (payloads.encode(_BATCH), payloads.validate_readings),
    (payloads.encode({**_BATCH, "seq": -1}), payloads.validate_readings),
    (b'{"schema_version": 2, "turbine_id": "gw1-t00", "seq": ' + b"9" * 30 + b', "columns": {}}',
     payloads.validate_readings),
    (b'{"schema_version": 1, "turbine_id": "gw1-t00", "seq": 1, "samples": [{"ts": NaN}]}',
     payloads.validate_readings),
    (b'{"schema_version": 1, "turbine_id": "gw1-t00", "seq": 1, "samples": [{"ts": 1e400}]}',
     payloads.validate_readings),
    (b"[" * 5000 + b"]" * 5000, payloads.validate_readings),
    (b"\xff\xfe{}", payloads.validate_readings),
    (b'{"schema_version": 1', payloads.validate_readings),
    (b'"just a string"', payloads.validate_readings),
    (b'{"schema_version": "1"}', payloads.validate_readings),
    (payloads.encode(payloads.drift("gw1-t00", "1.0.1", 1.5, 600, {"rps": 0.4}, {"rps": 0.2})),
     payloads.validate_drift),
    (payloads.encode(payloads.capture("gw1", "gw1-t00", "1.0.1", 1.5, 99, ["rps"], [[1.0]] * 3, [0.5], [1.0],
                                      "sampled", 0)), payloads.validate_capture),
]


@pytest.mark.parametrize("raw, validate", FALLBACK_CORPUS)
def test_the_standard_library_fallback_reaches_the_same_verdicts_as_orjson(monkeypatch, raw, validate):
    """The cloud's Lambda zip has no orjson: ``decode`` then parses with ``json``, and every
    message must get the same verdict (accepted as the same object, or dropped for the same kind)."""
    assert payloads._orjson, "orjson is a device requirement and installed by scripts/setup"
    fast = _verdict(raw, validate, payloads.BATCH_VERSIONS)
    monkeypatch.setattr(payloads, "_orjson", False)
    assert _verdict(raw, validate, payloads.BATCH_VERSIONS) == fast


@pytest.mark.parametrize("changes, kind", [
    ({"method": "ks"}, "wrong_type"), ({"samples": -1}, "wrong_type"), ({"score": {"rps": -0.1}}, "out_of_range"),
    ({"thresholds": {"voltage": 0.2}}, "wrong_type"), ({"thresholds": {"rps": 0.0}}, "out_of_range"),
    ({"drifted": ["voltage"]}, "wrong_type"), ({"score": {"rps": float("inf")}}, "non_finite"),
])
def test_a_bad_drift_record_is_named_by_kind(changes, kind):
    record = payloads.drift("gw1-t00", "1.0.1", 1.5, 600, {"rps": 0.4}, {"rps": 0.2})
    assert record["drifted"] == ["rps"] and payloads.validate_drift(record) is record
    assert kind_of(payloads.validate_drift, {**record, **changes}) == kind


@pytest.mark.parametrize("changes, kind", [
    ({"reason": "because"}, "wrong_type"), ({"label": 2}, "wrong_type"), ({"label": True}, "wrong_type"),
    ({"rows": [[1.0, 2.0]] * 3}, "wrong_type"), ({"rows": [[float("nan")]] * 3}, "non_finite"),
    ({"feature_errors": [0.5, 0.5]}, "length_mismatch"), ({"features": []}, "wrong_type"),
    ({"rows": [[10**400]] * 3}, "out_of_range"),
])
def test_a_bad_capture_record_is_named_by_kind(changes, kind):
    record = payloads.capture("gw1", "gw1-t00", "1.0.1", 1.5, 99, ["rps"], [[1.0]] * 3, [2.0], [1.0], "flagged", 1)
    assert record["anomaly"] and record["score"] == 2.0 and payloads.validate_capture(record) is record
    assert kind_of(payloads.validate_capture, {**record, **changes}) == kind
