"""Payload shapes of every windfleet message, their builders and validators.

All payloads are UTF-8 JSON objects carrying ``schema_version``.  Validators
raise :class:`MalformedPayload` whose ``kind`` names what was wrong, so
consumers can count drops per kind and log each kind once (rate limited).
Kinds: ``too_large``, ``not_json`` (not JSON, not UTF-8), ``too_deep`` (nested beyond
the parser), ``not_object``, ``schema_version``, ``missing_field``, ``wrong_type``,
``non_finite`` (NaN, Infinity, 1e400), ``out_of_range`` (an integer beyond a float64,
or a sequence number beyond ``MAX_INT``), ``length_mismatch`` (columns of a batch that
differ in length).  No other exception escapes ``decode`` (any bytes or str) or a
validator (any object ``decode`` returns).  Nothing here does I/O.

Versions: ``schema_version`` 1 is every payload's first form.  Readings and scores also
have a batched, columnar form, ``schema_version`` 2 (:func:`readings_batch`,
:func:`score_batch`): one array per field, many samples or windows per message, because
on the device's IPC bus the cost is per message, not per byte.  Consumers accept both
forms of readings and scores during a rollout (``decode(raw, versions=...)``); every
other payload is version 1 only.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

# NumPy is imported where readings are tabulated (the detector has it; the forwarder's
# runtime does not need it).  orjson -- 8x faster parsing and 10x faster writing of number
# arrays (benchmarks/README.md) -- is in every component's device requirements; a runtime
# without it (the cloud's Lambda zip) uses the standard library, with the same verdicts.
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - installed everywhere but in the Lambda zip
    _orjson = False

SCHEMA_VERSION = 1
BATCH_VERSION = 2  # columnar readings and score batches
BATCH_VERSIONS = (SCHEMA_VERSION, BATCH_VERSION)  # what readings / scores consumers accept
MAX_PAYLOAD_BYTES = 256 * 1024  # larger messages are refused before parsing
# Sequence numbers and other counters: non-negative integers every JSON consumer reads
# exactly (JavaScript's Number.MAX_SAFE_INTEGER; well inside SQLite's 64-bit INTEGER).
MAX_INT = 2**53 - 1

# Raw sensor channels in a reading sample (the sample's sensors).  ``ts`` is epoch seconds.
SAMPLE_FIELDS = ("ts", "rps", "wind_speed_rps", "voltage", "qw", "qx", "qy", "qz")
# Extra channels the simulator also sends; optional for consumers.
EXTRA_SAMPLE_FIELDS = ("temperature", "vibration", "pitch_angle")

RECORD_TYPES = ("score", "health", "log", "drift")


class MalformedPayload(ValueError):
    """A message that cannot be used.  ``kind`` is a short, countable reason."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def encode(payload: dict) -> bytes:
    """Compact UTF-8 JSON; ValueError for NaN/Infinity (not JSON: browsers and Lambda reject it)."""
    orjson = _orjson
    if orjson:
        try:
            raw = orjson.dumps(payload)
        except TypeError:  # e.g. an int beyond 64 bits: the standard library's verdict below
            raw = b"null"
        if b"null" not in raw:  # orjson writes NaN/Infinity as null: let json.dumps judge those
            return raw
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode(raw: bytes | str, versions: Sequence[int] = (SCHEMA_VERSION,)) -> dict:
    """Parse a payload and check its envelope (``schema_version`` in ``versions``);
    MalformedPayload on any problem."""
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError as exc:  # lone surrogates: not text any consumer can read
            raise MalformedPayload("not_json", f"not UTF-8: {exc.reason}") from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise MalformedPayload("too_large", f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
    obj = None
    orjson = _orjson
    if orjson:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library below says what is wrong, in its own words
    if obj is None or _has_big_float(obj):
        obj = _std_loads(raw)
    if not isinstance(obj, dict):
        raise MalformedPayload("not_object", type(obj).__name__)
    version = obj.get("schema_version")
    if type(version) is not int or version not in versions:
        raise MalformedPayload("schema_version", f"unsupported schema_version {version!r}")
    return obj


_COUNTERS = ("seq", "window_end_seq", "start_seq", "end_seq")


def _has_big_float(obj: Any) -> bool:
    """orjson reads an integer beyond 64 bits as a float; json.loads keeps it an int (which
    the validators call out of range).  Only a top-level counter is one where that matters."""
    if isinstance(obj, dict):
        for key in _COUNTERS:
            if type(obj.get(key)) is float:
                return True
    return False


def _std_loads(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except MalformedPayload:
        raise
    except RecursionError:
        # e.g. b"[[[[..." a few thousand deep: well under MAX_PAYLOAD_BYTES, deeper than
        # the parser recurses.  No windfleet payload nests more than a few levels.
        raise MalformedPayload("too_deep", "JSON nested deeper than the parser allows") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPayload("not_json", str(exc)[:80]) from None


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
    """Simulator -> detector, version 1 (one object per sample).  ``seq`` numbers the
    first sample; samples are consecutive."""
    return {"schema_version": SCHEMA_VERSION, "turbine_id": turbine_id, "seq": seq, "samples": samples}


def readings_batch(turbine_id: str, seq: int, columns: Mapping[str, Any]) -> dict:
    """Simulator -> detector, version 2: ``columns`` maps each field (``SAMPLE_FIELDS``,
    optionally ``EXTRA_SAMPLE_FIELDS``) to an equal-length array, sample ``i`` having
    sequence number ``seq + i``.  ``{"schema_version": 2, "turbine_id", "seq",
    "columns": {"ts": [...], "rps": [...], ...}}``."""
    return {"schema_version": BATCH_VERSION, "turbine_id": turbine_id, "seq": seq,
            "columns": {k: v.tolist() if hasattr(v, "tolist") else list(v) for k, v in columns.items()}}


_NUMBER = {float, int}


def readings_table(obj: dict) -> "np.ndarray":
    """A decoded readings payload (version 1 or 2) -> its samples as ``(n, len(SAMPLE_FIELDS))``
    float64 in ``SAMPLE_FIELDS`` order; MalformedPayload names what is wrong.

    The whole batch is checked at once with NumPy (types per column, then one array,
    then one ``isfinite``): this runs for every readings message on the device."""
    turbine, seq = obj.get("turbine_id"), obj.get("seq")
    if obj.get("schema_version") == BATCH_VERSION:
        columns = obj.get("columns")
        if type(turbine) is not str or not turbine or type(seq) is not int or seq < 0 \
                or type(columns) is not dict:
            _str(obj, "turbine_id")
            _int(obj, "seq")
            raise MalformedPayload("missing_field" if columns is None else "wrong_type", "columns")
        cols = []
        for field in SAMPLE_FIELDS:
            col = columns.get(field)
            if type(col) is not list or not col:
                raise MalformedPayload("missing_field" if col is None else "wrong_type", f"columns.{field}")
            if not set(map(type, col)) <= _NUMBER:  # bool is not a number here, nor is None
                raise MalformedPayload("wrong_type", f"columns.{field} holds a non-number")
            cols.append(col)
        n = len(cols[0])
        if len(set(map(len, cols))) != 1:
            raise MalformedPayload("length_mismatch", "columns differ in length")
        table = _float_table(cols, "columns").T
    else:
        samples = obj.get("samples")
        if type(turbine) is not str or not turbine or type(seq) is not int or seq < 0 or type(samples) is not list:
            validate_readings(obj)  # names what is wrong
        try:
            rows = [[s[k] for k in SAMPLE_FIELDS] for s in samples]
        except (KeyError, TypeError, IndexError):
            rows = None
        if not samples or rows is None or not {type(v) for row in rows for v in row} <= _NUMBER:
            validate_readings(obj)  # names what is wrong
            raise MalformedPayload("wrong_type", "samples")  # pragma: no cover - it always does
        table = _float_table(rows, "samples")
        n = len(table)
    if seq + n - 1 > MAX_INT:  # the last sample's seq becomes a window_end_seq
        raise MalformedPayload("out_of_range", f"seq of the last sample > {MAX_INT}")
    return table


def _float_table(rows: list, what: str) -> "np.ndarray":
    import numpy as np

    try:
        table = np.array(rows, dtype=np.float64)
    except OverflowError:  # an int beyond float64 (JSON allows 1e400 written as digits)
        raise MalformedPayload("out_of_range", f"{what} hold a number beyond a 64-bit float") from None
    if not np.isfinite(table).all():
        raise MalformedPayload("non_finite", what)
    return table


def readings_samples(obj: dict) -> list[dict]:
    """A readings payload of either version -> one dict per sample (tools and tests; the
    detector's hot path uses :func:`readings_table`)."""
    if obj.get("schema_version") == BATCH_VERSION:
        columns = obj["columns"]
        return [dict(zip(columns, row)) for row in zip(*columns.values())]
    return obj["samples"]


def validate_readings(obj: dict) -> dict:
    """Check a decoded readings payload (version 1 or 2); returns it (version 1: with
    samples' values as floats)."""
    if obj.get("schema_version") == BATCH_VERSION:
        readings_table(obj)
        return obj
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
# A turbine is not normal the moment a fault ends: a rotor spun up by overspeed takes ~6 s to
# slow down, a yawed nacelle ~12 s to slew back (measured on the simulator: a model's alarm rate
# on windows starting 0-3 s after a yaw fault 1.00, 9-12 s 0.22, 12-15 s 0.05, later 0.01).
# Consumers judging "normal" data (the canary's false-alarm count, drift, captured windows'
# labels) treat this many samples after an episode as part of it; recall uses the episode alone.
LABEL_RECOVERY_SAMPLES = 300  # 15 s at the simulator's 20 Hz


def in_episode(ends, window: int, start: int, end: int, recovery: int = 0):
    """Whether the window of ``window`` samples ending at sample ``ends`` (covering ``ends - window
    + 1 .. ends``; a number, or a NumPy array of them) overlaps the labelled episode ``start <= seq
    < end`` -- or, with ``recovery=LABEL_RECOVERY_SAMPLES``, the turbine's recovery after it."""
    return (ends >= start) & (ends - window + 1 < end + recovery)


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


def score_batch(turbine_id: str, model_version: str, features: Sequence[str], thresholds: Sequence[float],
                window_end_seq: Sequence[int], ts: Sequence[float], feature_errors: Any) -> dict:
    """Detector -> forwarder, version 2: the windows of one turbine scored in one batch.

    ``{"schema_version": 2, "turbine_id", "model_version", "features": [F names],
    "thresholds": [F], "window_end_seq": [k], "ts": [k], "feature_errors": [k x [F]]}``;
    window ``i`` is what :func:`score` would say about ``window_end_seq[i]`` -- and
    :func:`score_records` turns the batch into exactly those version-1 records, which is
    what the forwarder sends and the cloud stores."""
    errors = feature_errors.tolist() if hasattr(feature_errors, "tolist") else [list(e) for e in feature_errors]
    return {
        "schema_version": BATCH_VERSION, "turbine_id": turbine_id, "model_version": model_version,
        "features": list(features), "thresholds": [float(t) for t in thresholds],
        "window_end_seq": [int(e) for e in window_end_seq], "ts": [float(t) for t in ts], "feature_errors": errors,
    }


def validate_score_batch(obj: dict) -> dict:
    """Check a decoded version-2 score batch as a whole (NumPy); returns it."""
    _str(obj, "turbine_id")
    _str(obj, "model_version")
    features = obj.get("features")
    if type(features) is not list or not features or not all(isinstance(f, str) and f for f in features) \
            or len(set(features)) != len(features):
        raise MalformedPayload("missing_field" if features is None else "wrong_type", "features")
    lists = {}
    for field in ("thresholds", "window_end_seq", "ts", "feature_errors"):
        value = obj.get(field)
        if type(value) is not list or not value:
            raise MalformedPayload("missing_field" if value is None else "wrong_type", field)
        lists[field] = value
    k, n_features = len(lists["window_end_seq"]), len(features)
    if len(lists["ts"]) != k or len(lists["feature_errors"]) != k or len(lists["thresholds"]) != n_features:
        raise MalformedPayload("length_mismatch", "window_end_seq, ts, feature_errors, features, thresholds")
    if not set(map(type, lists["window_end_seq"])) <= {int} or \
            not all(0 <= e <= MAX_INT for e in lists["window_end_seq"]):
        raise MalformedPayload("wrong_type", f"window_end_seq must hold integers in 0..{MAX_INT}")
    rows = lists["feature_errors"]
    if not all(type(r) is list and len(r) == n_features for r in rows):
        raise MalformedPayload("wrong_type", "feature_errors must be k rows of one number per feature")
    for field, values in (("ts", lists["ts"]), ("thresholds", lists["thresholds"]),
                          ("feature_errors", [v for r in rows for v in r])):
        if not set(map(type, values)) <= _NUMBER:
            raise MalformedPayload("wrong_type", f"{field} holds a non-number")
        try:  # plain Python: a few hundred numbers, and the forwarder's runtime has no NumPy
            finite = all(map(math.isfinite, values))
        except OverflowError:  # an int beyond float64
            raise MalformedPayload("out_of_range", f"{field} holds a number beyond a 64-bit float") from None
        if not finite:
            raise MalformedPayload("non_finite", field)
        if field == "thresholds" and not all(v > 0 for v in values):
            raise MalformedPayload("out_of_range", "thresholds must be positive")
    return obj


def score_records(batch: dict) -> list[dict]:
    """A validated score batch -> one version-1 :func:`score` payload per window, in order."""
    features, thresholds = batch["features"], batch["thresholds"]
    named_thresholds = dict(zip(features, thresholds))
    return [score(batch["turbine_id"], ts, batch["model_version"], end, dict(zip(features, errs)), named_thresholds)
            for end, ts, errs in zip(batch["window_end_seq"], batch["ts"], batch["feature_errors"])]


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


# ---------------------------------------------------------------- canary shadow statistics
# Carried by the detector's health payload as ``shadow`` while a candidate model is loaded
# (``health(..., shadow=shadow_stats(...))``); cumulative since the candidate was loaded.
SHADOW_MODEL_FIELDS = ("alarms", "alarm_rate", "score_p50", "score_p90", "score_p99", "infer_ms_p50",
                       "infer_ms_p99")
SHADOW_COUNT_FIELDS = ("windows", "either_flagged", "both_flagged", "labelled_episodes", "current_detected",
                       "candidate_detected", "errors")
# Added with the false-alarm gate: optional, so a detector from before it still reports.
SHADOW_OPTIONAL_COUNTS = ("clean_windows",)


def shadow_stats(candidate_version: str, current_version: str, since: float, windows: int,
                 current: Mapping[str, float], candidate: Mapping[str, float], either_flagged: int,
                 both_flagged: int, labelled_episodes: int = 0, current_detected: int = 0,
                 candidate_detected: int = 0, errors: int = 0, clean_windows: int = 0,
                 current_false_alarms: int = 0, candidate_false_alarms: int = 0) -> dict:
    """Detector -> cloud (inside health): both models on the same ``windows`` since ``since``.

    ``current``/``candidate``: ``alarms`` (windows flagged), ``alarm_rate`` (alarms / windows),
    ``score_p50/p90/p99`` (window score quantiles), ``infer_ms_p50/p99`` (inference cost per
    window).  ``agreement`` = both_flagged / either_flagged (1.0 when neither flagged any).
    ``labelled_episodes``: labelled anomaly episodes seen; ``*_detected``: how many of them each
    model flagged (recall = detected / episodes).  ``errors``: candidate scoring failures.
    ``clean_windows``: windows of turbines that publish labels, overlapping no labelled episode;
    ``current/candidate.false_alarms``: how many of them each model flagged (the false-alarm
    rate the canary gates on: unlike the alarm rate it does not reward a model that flags
    everything where anomalies are frequent).
    """
    return {
        "candidate_version": candidate_version, "current_version": current_version, "since": since,
        "windows": windows,
        "current": {**{k: current[k] for k in SHADOW_MODEL_FIELDS}, "false_alarms": current_false_alarms},
        "candidate": {**{k: candidate[k] for k in SHADOW_MODEL_FIELDS}, "false_alarms": candidate_false_alarms},
        "either_flagged": either_flagged, "both_flagged": both_flagged,
        "agreement": both_flagged / either_flagged if either_flagged else 1.0,
        "labelled_episodes": labelled_episodes, "current_detected": current_detected,
        "candidate_detected": candidate_detected, "errors": errors, "clean_windows": clean_windows,
    }


def validate_shadow(obj: Any) -> dict:
    """A ``shadow`` object as :func:`shadow_stats` makes it; MalformedPayload otherwise."""
    if not isinstance(obj, dict):
        raise MalformedPayload("wrong_type", "shadow")
    _str(obj, "candidate_version")
    _str(obj, "current_version")
    _finite(obj.get("since"), "since")
    for field in SHADOW_COUNT_FIELDS + tuple(f for f in SHADOW_OPTIONAL_COUNTS if f in obj):
        if _int(obj, field) < 0:
            raise MalformedPayload("out_of_range", field)
    for side in ("current", "candidate"):
        stats = obj.get(side)
        if not isinstance(stats, dict):
            raise MalformedPayload("wrong_type", side)
        for field in SHADOW_MODEL_FIELDS + (("false_alarms",) if "false_alarms" in stats else ()):
            if _finite(stats.get(field), f"{side}.{field}") < 0:
                raise MalformedPayload("out_of_range", f"{side}.{field}")
    if not 0.0 <= _finite(obj.get("agreement"), "agreement") <= 1.0:
        raise MalformedPayload("out_of_range", "agreement")
    return obj


# ---------------------------------------------------------------- drift
DRIFT_METHODS = ("psi",)


def drift(turbine_id: str, model_version: str, ts: float, samples: int, score: Mapping[str, float],
          thresholds: Mapping[str, float], method: str = "psi") -> dict:
    """Detector -> forwarder -> cloud (telemetry record type ``drift``): one turbine's inputs
    against the training data of the model it runs.

    ``score``: per feature, the drift measure (``method``; PSI over the card's bins) of the
    turbine's last ``samples`` readings against the card's reference; ``thresholds``: the
    card's per-feature limits; ``drifted``: the features above their limit (a non-empty list
    is the "retrain suggested" signal)."""
    return {
        "schema_version": SCHEMA_VERSION, "turbine_id": turbine_id, "model_version": model_version, "ts": ts,
        "method": method, "samples": int(samples),
        "score": {f: float(v) for f, v in score.items()},
        "thresholds": {f: float(thresholds[f]) for f in score},
        "drifted": [f for f, v in score.items() if v > thresholds[f]],
    }


def validate_drift(obj: dict) -> dict:
    _str(obj, "turbine_id")
    _str(obj, "model_version")
    _finite(obj.get("ts"), "ts")
    if obj.get("method") not in DRIFT_METHODS:
        raise MalformedPayload("wrong_type", f"method {obj.get('method')!r}")
    _int(obj, "samples")
    score, thresholds = obj.get("score"), obj.get("thresholds")
    if not isinstance(score, dict) or not score or not isinstance(thresholds, dict) or set(thresholds) != set(score):
        raise MalformedPayload("wrong_type", "score and thresholds must name the same features")
    for name in score:
        if _finite(score[name], f"score.{name}") < 0 or _finite(thresholds[name], f"thresholds.{name}") <= 0:
            raise MalformedPayload("out_of_range", name)
    drifted = obj.get("drifted")
    if type(drifted) is not list or not set(drifted) <= set(score):
        raise MalformedPayload("wrong_type", "drifted")
    return obj


# ---------------------------------------------------------------- capture (windows kept for retraining)
CAPTURE_REASONS = ("flagged", "sampled")
# Captured windows reach S3 as gzip JSON Lines objects, one ``capture`` record per line, under
# CAPTURE_PREFIX in the artifact bucket: the forwarder writes them, ``train --from-capture`` reads
# them, and the device role's policy (cloud/provision.py) lets devices write nothing else.
CAPTURE_PREFIX = "captures/"
CAPTURE_SUFFIX = ".jsonl.gz"


def capture_key(prefix: str, thing: str, ts: float, n: int) -> str:
    """``{prefix}{thing}/{YYYY}/{MM}/{DD}/{epoch_ms}-{n}.jsonl.gz``: object ``n`` of device ``thing``
    (UTC date of ``ts``)."""
    import datetime as _dt

    day = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return f"{prefix}{thing}/{day:%Y/%m/%d}/{int(ts * 1000)}-{n}{CAPTURE_SUFFIX}"


def capture(thing: str, turbine_id: str, model_version: str, ts: float, window_end_seq: int,
            features: Sequence[str], rows: Any, feature_errors: Sequence[float], thresholds: Sequence[float],
            reason: str, label: int | None = None) -> dict:
    """Detector -> forwarder -> S3: one raw window the detector kept.

    ``rows``: the window's model inputs before standardisation, ``window`` rows of one
    value per feature (what ``preprocessing.raw_features`` gave the model), so a later
    training run can compute its own statistics.  ``reason``: ``flagged`` (the model
    alarmed: every such window is kept) or ``sampled`` (a random fraction of normal ones).
    ``label``: ground truth where the device knows it (1 inside a labelled anomaly episode,
    0 outside while labels are being received), else None."""
    rows = rows.tolist() if hasattr(rows, "tolist") else [list(r) for r in rows]
    errors = [float(e) for e in feature_errors]
    limits = [float(t) for t in thresholds]
    score_ = max(e / t for e, t in zip(errors, limits))
    return {
        "schema_version": SCHEMA_VERSION, "thing": thing, "turbine_id": turbine_id, "model_version": model_version,
        "ts": ts, "window_end_seq": int(window_end_seq), "features": list(features), "rows": rows,
        "feature_errors": errors, "thresholds": limits, "score": score_, "anomaly": score_ > 1.0,
        "reason": reason, "label": label,
    }


def validate_capture(obj: dict) -> dict:
    """Check a decoded capture record (plain Python: the forwarder has no NumPy); returns it."""
    _str(obj, "thing")
    _str(obj, "turbine_id")
    _str(obj, "model_version")
    _finite(obj.get("ts"), "ts")
    _int(obj, "window_end_seq")
    if obj.get("reason") not in CAPTURE_REASONS:
        raise MalformedPayload("wrong_type", f"reason {obj.get('reason')!r}")
    if obj.get("label") not in (None, 0, 1) or isinstance(obj.get("label"), bool):
        raise MalformedPayload("wrong_type", "label must be 0, 1 or null")
    features = obj.get("features")
    if type(features) is not list or not features or not all(isinstance(f, str) and f for f in features):
        raise MalformedPayload("missing_field" if features is None else "wrong_type", "features")
    rows, n = obj.get("rows"), len(features)
    if type(rows) is not list or not rows or not all(type(r) is list and len(r) == n for r in rows):
        raise MalformedPayload("wrong_type", "rows must be a list of rows of one number per feature")
    for field, values in (("rows", [v for r in rows for v in r]), ("feature_errors", obj.get("feature_errors")),
                          ("thresholds", obj.get("thresholds"))):
        if type(values) is not list or len(values) < n or not set(map(type, values)) <= _NUMBER:
            raise MalformedPayload("wrong_type", field)
        try:
            finite = all(map(math.isfinite, values))
        except OverflowError:
            raise MalformedPayload("out_of_range", f"{field} holds a number beyond a 64-bit float") from None
        if not finite:
            raise MalformedPayload("non_finite", field)
    if len(obj["feature_errors"]) != n or len(obj["thresholds"]) != n:
        raise MalformedPayload("length_mismatch", "feature_errors, thresholds, features")
    _finite(obj.get("score"), "score")
    return obj
