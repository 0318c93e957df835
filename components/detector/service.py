"""com.windfleet.AnomalyDetector: streaming windows, batched onnxruntime scoring, model swaps.

Data path (two threads, one bounded queue between them)::

    bus dispatcher thread                      scoring thread (run()'s caller)
    ---------------------                      ------------------------------
    readings message -> decode + validate      up to ``max_batch`` windows from the queue,
    -> raw features -> per-turbine             any turbines -> prepare() (z-score, denoise)
    StreamWindower -> a window every STRIDE    -> one session.run -> window_errors vs the
    samples -> queue (bounded)                 card's thresholds -> one score per window

Windowing happens in the handler, before the bus acknowledges the message, so the
windower state always covers exactly the acknowledged readings; the queue holds
windows, and what is still queued at shutdown is saved with the windower tails.
A full queue first pushes back (the handler waits up to ``put_timeout``, which
holds the MQTT ack and so the broker's in-flight window), then drops the window
and counts it: memory stays bounded whatever the input rate.

Malformed messages are counted per kind, logged once per kind per minute, and
dropped; the handler never raises.

What a crash costs (measured in tests/test_faults.py): SIGTERM saves the window tails
and loses nothing; ``kill -9`` loses the tails held in memory, so the windows spanning
them -- at most ``WINDOW / STRIDE - 1`` (9) per turbine, plus any window queued for
scoring -- are not scored; readings after the last acknowledged one come again from the
persistent session.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from windfleet import jsonlog, payloads, topics
from windfleet import model_contract as mc
from windfleet.preprocessing import StreamWindower, prepare, raw_features

from .model import LoadedModel, ModelRejected, keep_as_last_good, last_good_dir, load_model

COMPONENT = "com.windfleet.AnomalyDetector"
MODEL_COMPONENT = "com.windfleet.AnomalyModel"
MODEL_CHECK_INTERVAL = 5.0  # seconds between looks at the model component's configuration
STATE_FILE = "detector_state.json"
# A message whose samples end this far before what the windower already has is not a
# QoS1 redelivery but a stream that started over (a restarted simulator, a replaced
# sensor box): start a fresh window instead of discarding its readings as duplicates.
RESTART_BACKSTEP = 10 * mc.WINDOW
FLOAT_MAX = float(np.finfo(np.float64).max)

log = logging.getLogger("windfleet.detector")

COUNTERS = (
    "messages_received", "readings_received", "readings_scored", "windows_scored", "score_batches",
    "malformed_dropped", "queue_dropped", "model_load_failures", "model_swaps", "stream_restarts",
    "windows_non_finite", "publish_errors",
)


@dataclass
class _Window:
    turbine: str
    end_seq: int
    ts: float
    raw: np.ndarray  # (WINDOW, F) raw features


def turbine_ids(thing: str, spec: Any) -> list[str]:
    """Configuration ``turbines`` -> ids: a count (``{thing}-t00`` ...) or an explicit list."""
    if isinstance(spec, bool):
        raise ValueError("turbines must be a count or a list of turbine ids")
    if isinstance(spec, int):
        return [topics.turbine_id(thing, i) for i in range(spec)]
    if isinstance(spec, str) and spec.isdigit():
        return [topics.turbine_id(thing, i) for i in range(int(spec))]
    if isinstance(spec, list) and all(isinstance(t, str) and t for t in spec):
        return list(spec)
    raise ValueError(f"turbines must be a count or a list of turbine ids, not {spec!r}")


_NUMBER_TYPES = {float, int}


def _fast_table(obj: dict) -> np.ndarray | None:
    """A readings payload's samples as ``(n, len(SAMPLE_FIELDS))`` float64, or None when
    anything is off (then ``payloads.validate_readings`` says what).

    Accepts exactly what ``validate_readings`` accepts (numbers, not bools, finite,
    every field present) at a fraction of its cost: this runs for every message."""
    turbine, seq, samples = obj.get("turbine_id"), obj.get("seq"), obj.get("samples")
    if type(turbine) is not str or not turbine or type(seq) is not int or seq < 0 \
            or type(samples) is not list or not samples or seq + len(samples) - 1 > payloads.MAX_INT:
        return None
    try:
        table = [[s[k] for k in payloads.SAMPLE_FIELDS] for s in samples]
    except (KeyError, TypeError, IndexError):
        return None
    if not {type(v) for row in table for v in row} <= _NUMBER_TYPES:
        return None
    try:
        arr = np.array(table, dtype=np.float64)
    except (OverflowError, ValueError):
        return None
    if not np.isfinite(arr).all():
        return None
    return arr


class Detector:
    """Scores the readings of ``turbines`` with ``model`` and publishes scores on ``bus``.

    Use :meth:`handle` as the bus handler (or call :meth:`subscribe`), run
    :meth:`serve` on a thread of your own until a stop event, then :meth:`shutdown`.
    :meth:`score_available` scores one batch synchronously (tests, benchmarks).
    """

    def __init__(self, bus, model: LoadedModel | None, turbines: Iterable[str], work_dir: str | os.PathLike, *,
                 max_batch: int = 256, queue_size: int = 1024, put_timeout: float = 1.0,
                 health_interval: float = 10.0, score_qos: int = 1):
        self.bus = bus
        self.thing = getattr(bus, "thing_name", "unknown")
        self.version = getattr(bus, "version", None) or "0.0.0"
        self.work_dir = Path(work_dir)
        self.turbines = list(dict.fromkeys(turbines))
        self.max_batch, self.put_timeout = max_batch, put_timeout
        self.health_interval, self.score_qos = health_interval, score_qos
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.malformed: dict[str, int] = {}
        self.state = "RUNNING"
        self.reason: str | None = None
        self.failed_model_version: str | None = None
        self._model = model
        self._failed_dir: Path | None = None
        self._windowers = {t: StreamWindower() for t in self.turbines}
        self._last_end: dict[str, int] = {}
        self._queue: queue.Queue[_Window] = queue.Queue(queue_size)
        self._overflow: list[_Window] = []  # windows cut while shutting down (scoring stopped)
        self._stopping = False
        self._swap_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._limited = jsonlog.RateLimited(log, interval=60.0)
        self._next_health = 0.0
        self._locate_model = None
        self._model_check = threading.Event()
        self._next_model_check = 0.0

    # ------------------------------------------------------------ model
    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def model_version(self) -> str | None:
        return self._model.version if self._model is not None else None

    def follow_model(self, locate) -> None:
        """Swap to ``locate()`` (a model dir or None) whenever it changes: checked every
        MODEL_CHECK_INTERVAL seconds and at once after :meth:`check_model_soon`."""
        self._locate_model = locate
        self._model_check.set()

    def check_model_soon(self, *_: Any) -> None:
        self._model_check.set()

    def _check_model(self) -> None:
        now = time.monotonic()
        if self._locate_model is None or (not self._model_check.is_set() and now < self._next_model_check):
            return
        self._model_check.clear()
        self._next_model_check = now + MODEL_CHECK_INTERVAL
        try:
            wanted = self._locate_model()
        except Exception as exc:  # noqa: BLE001 - the model component may not be deployed yet
            self._limited.warn("locate_model", "cannot locate the model component", error=repr(exc)[:200])
            return
        if wanted is None:
            return
        wanted = Path(wanted).resolve()
        current = self._model.model_dir.resolve() if self._model is not None else None
        if wanted != current and wanted != self._failed_dir:
            if not self.swap(wanted):
                self._failed_dir = wanted

    def swap(self, model_dir: str | os.PathLike) -> bool:
        """Load, verify and self-test ``model_dir`` on the caller's thread, then swap it in
        between two batches.  On failure the current model keeps scoring and the
        failure is reported (ERRORED + reason).  Returns True when swapped."""
        with self._swap_lock:
            try:
                new = load_model(model_dir)
            except ModelRejected as exc:
                self.model_failed(exc)
                return False
            old, self._model = self._model, new  # one reference: the scoring loop reads it once per batch
            self._failed_dir, self.failed_model_version, self.reason = None, None, None
            self._bump("model_swaps")
            try:
                keep_as_last_good(new, self.work_dir)
            except OSError as exc:
                jsonlog.event(log, "cannot keep the model as last good", logging.WARNING, error=str(exc))
            jsonlog.event(log, "model swapped", old_version=old.version if old else None, model_version=new.version,
                          model_dir=str(model_dir))
            self.set_state("RUNNING")
            return True

    def model_failed(self, exc: ModelRejected) -> None:
        """Report a rejected package: the current model keeps scoring.

        The component stays RUNNING: ERRORED would make the nucleus restart it (and after
        three, BROKEN), which loses readings and fixes nothing.  The model component's own
        Install check is what fails the deployment."""
        self._bump("model_load_failures")
        self.failed_model_version = exc.version
        jsonlog.event(log, "model rejected; keeping the last good model", logging.ERROR,
                      reason=exc.reason, failed_model_version=exc.version, model_version=self.model_version)
        self.set_state("RUNNING", reason=exc.reason)

    def on_configuration_update(self, config: dict) -> None:
        """Bus configuration handler: a new ``model_dir`` is swapped in on a side thread."""
        new_dir = config.get("model_dir")
        current = self._model.model_dir.resolve() if self._model is not None else None
        if new_dir and Path(new_dir).resolve() != current:
            threading.Thread(target=self.swap, args=(new_dir,), name="detector-swap", daemon=True).start()

    # ------------------------------------------------------------ state / health
    def set_state(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason = state, reason
        extra: dict[str, Any] = {"model_version": self.model_version}
        if reason:
            extra.update(reason=reason, failed_model_version=self.failed_model_version)
        try:
            self.bus.update_state(state, counters=self.snapshot(), **extra)
        except Exception as exc:
            self._limited.warn("update_state", "cannot report state", error=repr(exc)[:200])

    def snapshot(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self.counters)

    def health(self) -> dict:
        extra: dict[str, Any] = {"model_version": self.model_version, "malformed_by_kind": dict(self.malformed),
                                 "queue_depth": self._queue.qsize(), "turbines": len(self.turbines)}
        if self.reason:
            extra.update(reason=self.reason, failed_model_version=self.failed_model_version)
        return payloads.health(self.thing, COMPONENT, self.version, self.state, time.time(), self.snapshot(), **extra)

    def publish_health(self) -> None:
        try:
            self.bus.publish(topics.health(self.thing), self.health(), qos=1)
        except Exception as exc:
            self._limited.warn("health", "cannot publish health", error=repr(exc)[:200])

    def _bump(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    # ------------------------------------------------------------ input
    def subscribe(self) -> None:
        for turbine in self.turbines:
            self.bus.subscribe(topics.readings(turbine), self.handle)

    def handle(self, topic: str, payload: bytes) -> None:
        """Bus handler for readings.  Never raises; every drop is counted."""
        self._bump("messages_received")
        try:
            self._accept(topic, payload)
        except payloads.MalformedPayload as exc:
            self._drop(exc.kind, exc.detail, topic)
        except Exception as exc:  # anything the validators did not foresee is still just a bad message
            self._drop("invalid", f"{type(exc).__name__}: {exc}"[:200], topic)

    def _drop(self, kind: str, detail: str, topic: Any) -> None:
        with self._counter_lock:
            self.counters["malformed_dropped"] += 1
            self.malformed[kind] = self.malformed.get(kind, 0) + 1
        self._limited.warn(f"malformed:{kind}", "malformed readings dropped", detail=str(detail)[:200],
                           topic=str(topic)[:200])

    def _accept(self, topic: str, payload: bytes) -> None:
        if not isinstance(payload, (bytes, bytearray, memoryview, str)):
            raise payloads.MalformedPayload("wrong_type", f"payload is {type(payload).__name__}")
        try:
            turbine = topics.turbine_of(topic)
        except (ValueError, AttributeError, TypeError):
            raise payloads.MalformedPayload("bad_topic", str(topic)[:100]) from None
        windower = self._windowers.get(turbine)
        if windower is None:
            raise payloads.MalformedPayload("unknown_turbine", turbine)
        obj = payloads.decode(bytes(payload) if not isinstance(payload, str) else payload)
        table = _fast_table(obj)
        if table is None:
            # Something is off: the contract's validator names what (and raises).  Should it
            # accept what the fast path refused, its verdict wins.
            payloads.validate_readings(obj)
            table = _fast_table(obj)
            if table is None:
                raise payloads.MalformedPayload("wrong_type", "samples")
        if obj["turbine_id"] != turbine:
            raise payloads.MalformedPayload("turbine_mismatch", f"{obj['turbine_id']!r} on {topic}")
        seq = obj["seq"]
        with np.errstate(all="ignore"):
            rows = raw_features({k: table[:, j] for j, k in enumerate(payloads.SAMPLE_FIELDS)})
        if not np.isfinite(rows).all():
            raise payloads.MalformedPayload("non_finite", "features overflow")
        if windower.next_seq is not None and seq + len(rows) <= windower.next_seq - RESTART_BACKSTEP:
            # The stream started over; see RESTART_BACKSTEP.
            windower = self._windowers[turbine] = StreamWindower()
            self._last_end.pop(turbine, None)
            self._bump("stream_restarts")
        self._bump("readings_received", len(rows))
        for end_seq, window in windower.push(seq, rows):
            ts = float(table[end_seq - seq, 0])
            self._enqueue(_Window(turbine, end_seq, ts, window))

    def _enqueue(self, item: _Window) -> None:
        if self._stopping:
            self._overflow.append(item)  # bounded by the broker's in-flight window; saved at shutdown
            return
        try:
            self._queue.put(item, timeout=self.put_timeout)
        except queue.Full:
            self._bump("queue_dropped")
            self._limited.warn("queue_full", "scoring queue full; window dropped", turbine=item.turbine,
                               window_end_seq=item.end_seq)

    # ------------------------------------------------------------ scoring
    def score_available(self, timeout: float = 0.2) -> int:
        """Score one batch (up to ``max_batch`` queued windows, any turbines); returns its size.
        Without a model nothing is scored: windows wait in the queue for the first one."""
        if self._model is None:
            time.sleep(timeout)
            return 0
        try:
            items = [self._queue.get(timeout=timeout)] if timeout > 0 else [self._queue.get_nowait()]
        except queue.Empty:
            return 0
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.score_windows(items)
        return len(items)

    def score_windows(self, items: list[_Window]) -> None:
        model = self._model  # read once: a swap takes effect between batches
        raw = np.stack([it.raw for it in items])
        with np.errstate(all="ignore"):
            x = prepare(raw, model.statistics)
            errors = model.run(x)
        bad = ~np.isfinite(errors)
        if bad.any():
            # Absurd but finite input can overflow the squares; such a window is anomalous, and
            # NaN/inf cannot travel in JSON.
            self._bump("windows_non_finite", int(bad.any(axis=1).sum()))
            errors = np.where(bad, FLOAT_MAX, errors)
        errors = errors.tolist()
        scored = 0
        for item, errs in zip(items, errors):
            last = self._last_end.get(item.turbine)
            scored += mc.WINDOW if last is None or item.end_seq <= last else min(mc.WINDOW, item.end_seq - last)
            self._last_end[item.turbine] = item.end_seq
            body = payloads.score(item.turbine, item.ts, model.version, item.end_seq,
                                  dict(zip(mc.FEATURES, errs)), model.thresholds)
            try:
                self.bus.publish(topics.scores(item.turbine), body, qos=self.score_qos)
            except Exception as exc:
                self._bump("publish_errors")
                self._limited.warn("publish", "cannot publish a score", error=repr(exc)[:200])
        with self._counter_lock:
            self.counters["windows_scored"] += len(items)
            self.counters["readings_scored"] += scored
            self.counters["score_batches"] += 1

    def serve(self, stop: threading.Event) -> None:
        """Score until ``stop`` is set, publishing health every ``health_interval`` seconds."""
        while not stop.is_set():
            self._check_model()
            self.score_available(timeout=0.2)
            now = time.monotonic()
            if now >= self._next_health:
                self._next_health = now + self.health_interval
                self.publish_health()

    # ------------------------------------------------------------ shutdown / restore
    def drain(self) -> None:
        """Score everything queued now (the bus must still be open to publish)."""
        while self.score_available(timeout=0):
            pass

    def shutdown(self, close_bus: bool = True) -> Path:
        """Stop cleanly: score what is queued, close the bus (finishing the message in
        hand), then save windower tails and any window cut meanwhile.  Returns the state file."""
        self._stopping = True
        self.drain()
        self.publish_health()
        if close_bus:
            self.bus.close()
        pending = list(self._overflow)
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return self.save_state(pending)

    def save_state(self, pending: list[_Window] = ()) -> Path:
        state = {
            "schema_version": 1,
            "model_version": self.model_version,
            "windowers": {t: w.state() for t, w in self._windowers.items() if w.next_seq is not None},
            "last_end": dict(self._last_end),
            "pending": [{"turbine": p.turbine, "end_seq": p.end_seq, "ts": p.ts, "raw": p.raw.tolist()}
                        for p in pending],
        }
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
        jsonlog.event(log, "state saved", turbines=len(state["windowers"]), pending_windows=len(pending))
        return path

    def restore_state(self) -> int:
        """Resume the windows saved by :meth:`shutdown`; returns how many turbines resumed.

        The file is consumed (renamed) so that a later crash -- which saves nothing --
        never resumes from a stale tail."""
        path = self.work_dir / STATE_FILE
        if not path.is_file():
            return 0
        try:
            state = json.loads(path.read_text())
            resumed = 0
            for turbine, wstate in state.get("windowers", {}).items():
                if turbine in self._windowers:
                    self._windowers[turbine] = StreamWindower.from_state(wstate)
                    resumed += 1
            self._last_end.update({t: int(e) for t, e in state.get("last_end", {}).items() if t in self._windowers})
            for p in state.get("pending", []):
                if p["turbine"] in self._windowers:
                    raw = np.asarray(p["raw"], dtype=np.float64).reshape(mc.WINDOW, len(mc.FEATURES))
                    self._enqueue(_Window(p["turbine"], int(p["end_seq"]), float(p["ts"]), raw))
        except Exception as exc:  # a damaged state file costs one window per turbine, not the detector
            jsonlog.event(log, "cannot restore the saved windows; starting fresh", logging.WARNING,
                          error=repr(exc)[:200])
            self._windowers = {t: StreamWindower() for t in self.turbines}
            self._last_end.clear()
            resumed = 0
        os.replace(path, path.with_suffix(".restored"))
        jsonlog.event(log, "state restored", turbines=resumed, pending_windows=self._queue.qsize())
        return resumed


def load_initial_model(model_dir: str | os.PathLike | None, work_dir: str | os.PathLike
                       ) -> tuple[LoadedModel | None, ModelRejected | None]:
    """The model to start with: ``model_dir`` when it passes every check (then kept as
    last good), else the last good model from ``work_dir`` and the rejection to report."""
    rejected: ModelRejected | None = None
    if model_dir:
        try:
            model = load_model(model_dir)
            try:
                keep_as_last_good(model, work_dir)
            except OSError as exc:
                jsonlog.event(log, "cannot keep the model as last good", logging.WARNING, error=str(exc))
            return model, None
        except ModelRejected as exc:
            rejected = exc
    else:
        rejected = ModelRejected("no model directory configured")
    fallback = last_good_dir(work_dir)
    if fallback is not None:
        try:
            return load_model(fallback), rejected
        except ModelRejected as exc:
            jsonlog.event(log, "last good model unusable", logging.ERROR, reason=exc.reason)
    return None, rejected


def model_locator(bus, models_root: str | os.PathLike) -> Any:
    """A function giving the model dir the model component's configuration names: the
    version under ``models_root`` (``{kernel:rootPath}/packages/artifacts/<model component>``)
    whose card carries the configured ``OnnxSha256`` (and ``ModelVersion``); None while nothing
    matches."""
    root = Path(models_root)

    def locate() -> Path | None:
        config = bus.get_configuration(MODEL_COMPONENT)
        sha, version = config.get("OnnxSha256"), config.get("ModelVersion")
        if not sha:
            return None
        matches = []
        for card_path in sorted(root.glob(f"*/{mc.CARD_FILE}")):
            try:
                card = json.loads(card_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(card, dict) and card.get("onnx_sha256") == sha:
                matches.append((card.get("version") == version, card_path.parent))
        # the same weights may ship under two versions: the card's version decides
        return max(matches, key=lambda m: m[0])[1] if matches else None
    return locate


def run(bus, model_dir: str | os.PathLike | None = None, work_dir: str | os.PathLike = ".",
        stop: threading.Event | None = None, turbines: Any = None, models_root: str | os.PathLike | None = None,
        **options: Any) -> int:
    """Run the detector on ``bus`` until ``stop`` is set; returns a process exit code.

    The model: ``model_dir`` when given, else the one the model component's configuration
    names under ``models_root`` (followed for the whole run, see :func:`model_locator`),
    else the last good one kept in ``work_dir``.  Without any, the detector runs, keeps
    windows queued and scores from the first model that arrives.

    Configuration keys (component configuration, overridden by arguments):
    ``turbines`` (count or ids), ``model_dir``, ``max_batch``, ``queue_size``,
    ``health_interval_s``.
    """
    stop = stop or threading.Event()
    config = bus.get_configuration() or {}
    model_dir = model_dir or config.get("model_dir")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ids = turbine_ids(bus.thing_name, turbines if turbines is not None else config.get("turbines", 1))
    settings = {
        "max_batch": int(config.get("max_batch", 256)),
        "queue_size": int(config.get("queue_size", 1024)),
        "health_interval": float(config.get("health_interval_s", 10.0)),
    }
    settings.update({k: v for k, v in options.items() if v is not None})
    locate = model_locator(bus, models_root) if models_root and not model_dir else None
    if locate is not None:
        try:
            model_dir = locate()
        except Exception as exc:  # noqa: BLE001 - not deployed yet: the last good model, then follow
            jsonlog.event(log, "model component not available yet", logging.WARNING, error=repr(exc)[:200])

    model, rejected = load_initial_model(model_dir, work_dir)
    if model is None and locate is None:
        reason = rejected.reason if rejected else "no model"
        jsonlog.event(log, "no usable model; cannot score", logging.ERROR, reason=reason)
        bus.update_state("ERRORED", reason=reason,
                         failed_model_version=rejected.version if rejected else "unknown")
        bus.close()
        return 1

    detector = Detector(bus, model, ids, work_dir, **settings)
    detector.restore_state()
    bus.on_configuration_update(detector.on_configuration_update)
    if locate is not None:
        detector.follow_model(locate)
        # Post-update events come with cloud deployments (NOTIFY_COMPONENTS); the periodic
        # check covers local ones, which send none (developer guide, "Interact with component lifecycle").
        bus.on_component_update(detector.check_model_soon)
    detector.subscribe()
    if rejected is not None and model is not None and model_dir:
        detector.model_failed(rejected)
    else:
        detector.set_state("RUNNING")
    jsonlog.event(log, "detector started", turbines=len(ids), model_version=detector.model_version,
                  model_dir=str(model.model_dir) if model else None, state=detector.state)
    try:
        detector.serve(stop)
    finally:
        detector.shutdown()
    jsonlog.event(log, "detector stopped", **detector.snapshot())
    return 0
