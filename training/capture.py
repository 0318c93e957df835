"""Read the windows devices captured, for ``windfleet train --from-capture``.

Where they are (i15 layout, what the forwarder's uploader writes): gzip JSON Lines
objects, one :func:`windfleet.payloads.capture` record per line, at
``{prefix}{thing}/{YYYY}/{MM}/{DD}/{epoch_ms}-{n}.jsonl.gz``.  A source is either

- ``s3://bucket/prefix`` (``s3://bucket`` alone means the uploader's default prefix
  ``captures/``) -- every ``*.jsonl.gz`` key under the prefix, listed with
  ``list_objects_v2`` (continuation tokens followed) and read with ``get_object`` on a
  :class:`~windfleet.cloud.backends.Backend`'s boto3-shaped S3 client (the local store's
  ``LocalS3`` or AWS), or
- a local directory holding the same files in any sub-folders.

Guarantees.  Every record is checked with :func:`~windfleet.payloads.validate_capture`;
a line that is not JSON or not a valid record, and an object that is not gzip (or ends
early), is counted by kind in :class:`Report` and skipped -- never fatal unless nothing
usable remains.  Records seen twice (an object uploaded twice after a retry) count once.

Which windows train (the normal-window policy), per record:

- ``label == 0``: normal (the device knew the turbine was healthy) -- trains;
- ``label == 1``: inside a labelled anomaly -- never trains;
- ``label is None`` (no ground truth): trains when the model that scored it did not
  flag it (``anomaly`` false).  ``include_flagged=True`` takes flagged unlabelled
  windows too: for data without labels whose old model alarms on a drifted but healthy
  turbine (the windows a retrain must learn).

Filters: ``since`` (epoch seconds, on the record's ``ts``) and ``turbines`` (ids).  All
records in scope must share one feature list and one window length (else DataError:
captures of two different models must be selected apart, e.g. with ``since``).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from windfleet import payloads
from windfleet.preprocessing import DataError

SUFFIX = payloads.CAPTURE_SUFFIX
DEFAULT_PREFIX = payloads.CAPTURE_PREFIX
FLAGGED_HINT = 0.8  # share of a turbine's windows flagged (unlabelled) above which reading suggests --include-flagged


@dataclass
class Report:
    """What reading the captures found: counts a user can act on."""

    objects: int = 0  # objects read
    records: int = 0  # valid records
    malformed: Counter = field(default_factory=Counter)  # kind -> lines/objects skipped
    skipped: Counter = field(default_factory=Counter)  # reason -> valid records not used (since, turbine, ...)
    used: int = 0  # windows kept for training

    def summary(self) -> str:
        parts = [f"{self.objects} objects, {self.records} valid records, {self.used} normal windows used"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.malformed:
            parts.append("malformed " + ", ".join(f"{k} {v}" for k, v in sorted(self.malformed.items())))
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"objects": self.objects, "records": self.records, "used": self.used,
                "malformed": dict(self.malformed), "skipped": dict(self.skipped)}


@dataclass
class Captures:
    """The normal captured windows, per turbine in time order."""

    features: list[str]
    window: int  # samples per window
    turbines: dict[str, np.ndarray]  # turbine id -> raw windows (k, window, F), oldest first
    seqs: dict[str, np.ndarray]  # turbine id -> each window's window_end_seq
    objects: list[str]  # the objects (URIs or paths) at least one used window came from
    parent: str | None  # the model version most used windows were scored by
    report: Report

    @property
    def windows(self) -> int:
        return sum(len(w) for w in self.turbines.values())


def parse_since(text: str | float | None) -> float | None:
    """``--since``: epoch seconds (``1764500000``) or ISO-8601 (``2026-11-30``,
    ``2026-11-30T10:00:00Z``; no zone means UTC) -> epoch seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise DataError(f"--since {text!r}: not epoch seconds or an ISO-8601 time (e.g. 2026-11-30T10:00:00Z)") \
            from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def is_normal(record: dict, include_flagged: bool = False) -> bool:
    """The normal-window policy (module docstring)."""
    label = record.get("label")
    if label is not None:
        return label == 0
    flagged = record.get("anomaly")
    if not isinstance(flagged, bool):
        flagged = record["score"] > 1.0
    return include_flagged or not flagged


# ---------------------------------------------------------------------------- objects
def iter_objects(source: str | Path, s3: Any = None) -> Iterator[tuple[str, bytes]]:
    """``(uri or path, bytes)`` of every ``*.jsonl.gz`` object under ``source``, in key order."""
    text = str(source)
    if text.startswith("s3://"):
        if s3 is None:
            raise DataError(f"{text}: reading S3 needs a backend (--capture-backend local|aws)")
        bucket, _, prefix = text[5:].partition("/")
        prefix = prefix or DEFAULT_PREFIX
        if not bucket:
            raise DataError(f"{text}: not an s3://bucket/prefix URI")
        for key in _list_keys(s3, bucket, prefix):
            yield f"s3://{bucket}/{key}", s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return
    root = Path(source)
    if root.is_file():
        yield str(root), root.read_bytes()
        return
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (--from-capture takes s3://bucket/prefix or a directory)")
    for path in sorted(p for p in root.rglob(f"*{SUFFIX}") if p.is_file()):
        yield str(path), path.read_bytes()


def _list_keys(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
    from botocore.exceptions import ClientError

    token = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            page = s3.list_objects_v2(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise DataError(f"s3://{bucket}/{prefix}: {err.get('Code')}: {err.get('Message')}") from None
        for item in page.get("Contents", []):
            if item["Key"].endswith(SUFFIX):
                yield item["Key"]
        token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        if not token:
            return


def parse_object(data: bytes, report: Report) -> Iterator[dict]:
    """The valid capture records of one gzip JSON Lines object; the rest is counted in
    ``report.malformed`` (``not_gzip``/``truncated`` for the object, the payload's
    kinds -- ``not_json``, ``wrong_type``, ... -- per line)."""
    try:
        with gzip.open(io.BytesIO(data), "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise payloads.MalformedPayload("not_object")
                    yield payloads.validate_capture(record)
                except ValueError as exc:  # MalformedPayload is one; json's errors are too
                    report.malformed[getattr(exc, "kind", "not_json")] += 1
    except gzip.BadGzipFile:
        report.malformed["not_gzip"] += 1
    except (EOFError, zlib.error, OSError):  # cut short (a partial upload or copy): the lines before it count
        report.malformed["truncated"] += 1


# ---------------------------------------------------------------------------- read
def read_captures(source: str | Path, *, s3: Any = None, since: float | None = None,
                  turbines: Iterable[str] | None = None, include_flagged: bool = False,
                  log: Callable[[str], None] = print) -> Captures:
    """Read, validate, filter and select the normal captured windows (module docstring).

    Raises DataError with a one-line reason when nothing usable remains, or when the
    windows in scope disagree on features or window length."""
    wanted = set(turbines) if turbines else None
    report = Report()
    seen: set[tuple] = set()
    kept: dict[str, list[tuple[float, int, list, str, str]]] = {}  # turbine -> (ts, seq, rows, version, object)
    shapes: dict[tuple[tuple[str, ...], int], tuple[int, str]] = {}  # (features, window) -> (count, an object)
    in_scope: Counter = Counter()  # turbine -> windows after the filters
    flagged: Counter = Counter()  # turbine -> unlabelled flagged windows left out
    for name, data in iter_objects(source, s3):
        report.objects += 1
        for r in parse_object(data, report):
            report.records += 1
            key = (r["thing"], r["turbine_id"], r["ts"], r["window_end_seq"])
            if key in seen:
                report.skipped["duplicate"] += 1
                continue
            seen.add(key)
            if since is not None and r["ts"] < since:
                report.skipped["before_since"] += 1
                continue
            if wanted is not None and r["turbine_id"] not in wanted:
                report.skipped["other_turbine"] += 1
                continue
            shape = (tuple(r["features"]), len(r["rows"]))
            count, first = shapes.get(shape, (0, name))
            shapes[shape] = (count + 1, first)
            in_scope[r["turbine_id"]] += 1
            if not is_normal(r, include_flagged):
                report.skipped["labelled_anomaly" if r.get("label") == 1 else "flagged"] += 1
                flagged[r["turbine_id"]] += r.get("label") is None
                continue
            kept.setdefault(r["turbine_id"], []).append(
                (r["ts"], r["window_end_seq"], r["rows"], r["model_version"], name))
    if report.objects == 0:
        raise DataError(f"{source}: no capture objects (*{SUFFIX}) found")
    if len(shapes) > 1:
        described = "; ".join(f"{len(f)} features [{','.join(f)}] x {w} samples: {n} windows (e.g. {obj})"
                              for (f, w), (n, obj) in sorted(shapes.items(), key=lambda kv: -kv[1][0]))
        raise DataError(f"{source}: captured windows disagree on features or window length ({described}); "
                        "they come from different models: select one with --since or --turbines")
    # a turbine flagged nearly all the time is more likely drifted than broken: say how to learn it
    persistent = sorted(t for t, n in flagged.items() if n >= 10 and n >= FLAGGED_HINT * in_scope[t])
    if persistent:
        log(f"capture: turbine(s) {', '.join(persistent)}: most captured windows unlabelled and flagged by the old "
            "model, left out; if that is drift on a healthy turbine, --include-flagged trains on them")
    if wanted is not None and (missing := wanted - set(kept)):
        log(f"capture: no normal windows for turbine(s) {', '.join(sorted(missing))}")
    used = sum(len(v) for v in kept.values())
    report.used = used
    log(f"capture: {report.summary()}")
    if not used:
        raise DataError(f"{source}: no usable normal windows ({report.summary()})")
    ((features, window),) = shapes
    versions: Counter = Counter()
    objects: set[str] = set()
    out_w, out_s = {}, {}
    for turbine, items in sorted(kept.items()):
        items.sort(key=lambda it: (it[0], it[1]))
        out_w[turbine] = np.asarray([it[2] for it in items], dtype=np.float64)
        out_s[turbine] = np.asarray([it[1] for it in items], dtype=np.int64)
        versions.update(it[3] for it in items)
        objects.update(it[4] for it in items)
    return Captures(list(features), window, out_w, out_s, sorted(objects), versions.most_common(1)[0][0], report)
