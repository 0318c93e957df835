"""Payload shapes of every windfleet message, their builders and validators.

All payloads are UTF-8 JSON objects carrying ``schema_version``.  Validators
raise :class:`MalformedPayload` whose ``kind`` names what was wrong, so
consumers can count drops per kind and log each kind once (rate limited).
Kinds: ``too_large``, ``not_json`` (not JSON, not UTF-8), ``too_deep`` (nested beyond
the parser), ``not_object``, ``schema_version``, ``missing_field``, ``wrong_type``,
``non_finite`` (NaN, Infinity, 1e400), ``out_of_range`` (an integer beyond a float64,
or a sequence number beyond ``MAX_INT``).  No other exception escapes ``decode`` (any
bytes or str) or a validator (any object ``decode`` returns).  Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024  # larger messages are refused before parsing
# Sequence numbers and other counters: non-negative integers every JSON consumer reads
# exactly (JavaScript's Number.MAX_SAFE_INTEGER; well inside SQLite's 64-bit INTEGER).
MAX_INT = 2**53 - 1

# Raw sensor channels in a reading sample (the sample's sensors).  ``ts`` is epoch seconds.
SAMPLE_FIELDS = ("ts", "rps", "wind_speed_rps", "voltage", "qw", "qx", "qy", "qz")
# Extra channels the simulator also sends; optional for consumers.
EXTRA_SAMPLE_FIELDS = ("temperature", "vibration", "pitch_angle")

RECORD_TYPES = ("score", "health", "log")


class MalformedPayload(ValueError):
    """A message that cannot be used.  ``kind`` is a short, countable reason."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def encode(payload: dict) -> bytes:
    # allow_nan=False: NaN is not JSON and other consumers (browsers, Lambda) reject it.
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode(raw: bytes | str) -> dict:
    """Parse a payload and check its envelope; MalformedPayload on any problem."""
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError as exc:  # lone surrogates: not text any consumer can read
            raise MalformedPayload("not_json", f"not UTF-8: {exc.reason}") from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise MalformedPayload("too_large", f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except MalformedPayload:
        raise
    except RecursionError:
        # e.g. b"[[[[..." a few thousand deep: well under MAX_PAYLOAD_BYTES, deeper than
        # the parser recurses.  No windfleet payload nests more than a few levels.
        raise MalformedPayload("too_deep", "JSON nested deeper than the parser allows") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPayload("not_json", str(exc)[:80]) from None
    if not isinstance(obj, dict):
        raise MalformedPayload("not_object", type(obj).__name__)
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MalformedPayload("schema_version", f"unsupported schema_version {version!r}")
    return obj


def _reject_constant(name: str) -> Any:
    raise MalformedPayload("non_finite", name)


def _finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedPayload("wrong_type", f"{field} is {type(value).__name__}")
    try:
        number = float(value)  # an int beyond float64 (JSON allows 1e400 written as digits)
    except OverflowError:
        raise MalformedPayload("out_of_range", f"{field} does not fit a 64-bit float") from None
    if not math.isfinite(number):
        raise MalformedPayload("non_finite", field)
    return number


def _str(obj: dict, field: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not value:
        raise MalformedPayload("missing_field" if value is None else "wrong_type", field)
    return value


def _int(obj: dict, field: str) -> int:
    value = obj.get(field)
    if value is None:
        raise MalformedPayload("missing_field", field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedPayload("wrong_type", f"{field} must be a non-negative integer")
    if value > MAX_INT:
        raise MalformedPayload("out_of_range", f"{field} > {MAX_INT}")
    return value


# ---------------------------------------------------------------- readings
def readings(turbine_id: str, seq: int, samples: list[dict]) -> dict:
    """Simulator -> detector.  ``seq`` numbers the first sample; samples are consecutive."""
    return {"schema_version": SCHEMA_VERSION, "turbine_id": turbine_id, "seq": seq, "samples": samples}


def validate_readings(obj: dict) -> dict:
    """Check a decoded readings payload; returns it with samples' values as floats."""
    _str(obj, "turbine_id")
    seq = _int(obj, "seq")
    samples = obj.get("samples")
    if not isinstance(samples, list) or not samples:
        raise MalformedPayload("missing_field" if samples is None else "wrong_type", "samples")
    if seq + len(samples) - 1 > MAX_INT:  # the last sample's seq becomes a window_end_seq
        raise MalformedPayload("out_of_range", f"seq of the last sample > {MAX_INT}")
    for sample in samples:
        if not isinstance(sample, dict):
            raise MalformedPayload("wrong_type", "sample is not an object")
        for field in SAMPLE_FIELDS:
            if field not in sample:
                raise MalformedPayload("missing_field", f"samples[].{field}")
            sample[field] = _finite(sample[field], f"samples[].{field}")
    return obj


# ---------------------------------------------------------------- labels (ground truth)
def label(turbine_id: str, kind: str, start_seq: int, end_seq: int, severity: float) -> dict:
    """An injected anomaly episode covering samples ``start_seq <= seq < end_seq``."""
    return {
        "schema_version": SCHEMA_VERSION, "turbine_id": turbine_id, "kind": kind,
        "start_seq": start_seq, "end_seq": end_seq, "severity": severity,
    }


def validate_label(obj: dict) -> dict:
    _str(obj, "turbine_id")
    _str(obj, "kind")
    _int(obj, "start_seq")
    _int(obj, "end_seq")
    return obj


# ---------------------------------------------------------------- scores
def score(
    turbine_id: str,
    ts: float,
    model_version: str,
    window_end_seq: int,
    feature_errors: dict[str, float],
    thresholds: dict[str, float],
) -> dict:
    """Detector -> forwarder: one scored window.

    ``score`` is the largest error/threshold ratio over features, so ``score > 1``
    exactly when ``anomaly`` is true; it is the one number a chart or a
    ranking needs.
    """
    anomalous = [f for f, e in feature_errors.items() if e > thresholds[f]]
    ratio = max(e / thresholds[f] for f, e in feature_errors.items())
    return {
        "schema_version": SCHEMA_VERSION, "turbine_id": turbine_id, "ts": ts,
        "model_version": model_version, "window_end_seq": window_end_seq,
        "feature_errors": feature_errors, "thresholds": thresholds,
        "anomalous_features": anomalous, "anomaly": bool(anomalous), "score": ratio,
    }


def validate_score(obj: dict) -> dict:
    _str(obj, "turbine_id")
    _str(obj, "model_version")
    _int(obj, "window_end_seq")
    _finite(obj.get("ts"), "ts")
    errors = obj.get("feature_errors")
    if not isinstance(errors, dict) or not errors:
        raise MalformedPayload("wrong_type", "feature_errors")
    for name, value in errors.items():
        _finite(value, f"feature_errors.{name}")
    if not isinstance(obj.get("anomaly"), bool):
        raise MalformedPayload("wrong_type", "anomaly")
    # Optional (``score`` builds both), but when present consumers compute with them.
    if "score" in obj and obj["score"] is not None:
        _finite(obj["score"], "score")
    thresholds = obj.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            raise MalformedPayload("wrong_type", "thresholds")
        for name, value in thresholds.items():
            _finite(value, f"thresholds.{name}")
    return obj


# ---------------------------------------------------------------- health
# Component states, as Greengrass names them.
STATES = ("NEW", "INSTALLED", "STARTING", "RUNNING", "STOPPING", "ERRORED", "BROKEN", "FINISHED")


def health(
    thing: str, component: str, version: str, state: str, ts: float,
    counters: dict[str, int | float], **extra: Any,
) -> dict:
    """Any component -> forwarder/runtime.  ``extra`` carries e.g. ``model_version``, ``reason``."""
    return {
        "schema_version": SCHEMA_VERSION, "thing": thing, "component": component,
        "version": version, "state": state, "ts": ts, "counters": dict(counters), **extra,
    }


def validate_health(obj: dict) -> dict:
    _str(obj, "thing")
    _str(obj, "component")
    _str(obj, "version")
    if obj.get("state") not in STATES:
        raise MalformedPayload("wrong_type", f"state {obj.get('state')!r}")
    if not isinstance(obj.get("counters"), dict):
        raise MalformedPayload("wrong_type", "counters")
    return obj


# ---------------------------------------------------------------- logs
def log(thing: str, component: str, level: str, message: str, ts: float, **fields: Any) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "thing": thing, "component": component,
        "level": level, "message": message, "ts": ts, **fields,
    }


# ---------------------------------------------------------------- telemetry (to the cloud)
def telemetry(thing: str, seq: int, ts: float, records: Iterable[dict]) -> dict:
    """Forwarder -> cloud.  ``seq`` increases by one per message per device, across
    restarts, so the cloud can count gaps.  Each record is ``{"type": T, "body": payload}``
    with T in RECORD_TYPES (a score with ``anomaly: true`` is the anomaly record).
    """
    return {"schema_version": SCHEMA_VERSION, "thing": thing, "seq": seq, "ts": ts, "records": list(records)}


def telemetry_ack(thing: str, seq: int) -> dict:
    """Cloud -> forwarder: telemetry message ``seq`` of ``thing`` is stored (or was already).
    Only then does the forwarder delete it from its spool."""
    return {"schema_version": SCHEMA_VERSION, "thing": thing, "seq": seq}


def validate_telemetry_ack(obj: dict) -> dict:
    _str(obj, "thing")
    _int(obj, "seq")
    return obj


def validate_telemetry(obj: dict) -> dict:
    _str(obj, "thing")
    _int(obj, "seq")
    records = obj.get("records")
    if not isinstance(records, list):
        raise MalformedPayload("missing_field" if records is None else "wrong_type", "records")
    for record in records:
        if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES:
            raise MalformedPayload("wrong_type", "record type")
        if not isinstance(record.get("body"), dict):
            raise MalformedPayload("wrong_type", "record body")
    return obj
