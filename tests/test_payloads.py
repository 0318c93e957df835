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
