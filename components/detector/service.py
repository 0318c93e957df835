"""com.windfleet.AnomalyDetector: streaming windows, batched onnxruntime scoring, model swaps.

Data path (two threads, one bounded queue between them)::

    bus dispatcher thread                      scoring thread (run()'s caller)
    ---------------------                      ------------------------------
    readings message (v1 or columnar v2)       up to ``max_batch`` windows from the queue,
    -> decode + whole-batch NumPy check        any turbines -> prepare() (z-score, denoise)
    -> raw features (vectorised) -> the        -> one session.run -> window_errors vs the
    turbine's StreamWindower -> the rows of    card's thresholds -> ONE score batch message
    every window completed -> queue (bounded)  per turbine in the batch (payloads.score_batch)

Everything per message, per batch: no Python runs per sample or per window on the hot path
except building the score batch's lists.  Windowing happens in the handler, before the bus
acknowledges the message, so the windower state always covers exactly the acknowledged
readings; the queue holds the rows of completed windows (bounded by the number of windows),
and what is still queued at shutdown is saved with the windower tails.  A full queue first
pushes back (the handler waits up to ``put_timeout``, which holds the message's
acknowledgement), then drops the windows and counts them: memory stays bounded whatever
the input rate.

Window geometry (size, stride, input shape) comes from the loaded model's card.  A swap to
a model with another geometry first scores every queued window with the old model (no
readings lost, each window scored by the model it was cut for), then rebuilds the windowers
carrying their tails (``StreamWindower.resized``): the stream continues without a gap, and
when the new window is longer than the tail its first window waits for the rows it lacks.

Drift (:mod:`.drift`): the handler also counts each message's raw features into the turbine's
sliding histograms (no Python per sample); every ``drift_interval`` the scoring thread publishes
one drift record per turbine against the model card's reference.

Malformed messages are counted per kind, logged once per kind per minute, and
dropped; the handler never raises.

Canary: when the candidate model component (:data:`CANDIDATE_COMPONENT`) is deployed
beside the model, its package is loaded like any model and scores every batch's windows
in shadow after the batch's scores are published (:mod:`.shadow`); only the current
model's scores go out, the comparison goes out in health as ``shadow``.

What a crash costs (measured in tests/test_faults.py): SIGTERM saves the window tails
and loses nothing; ``kill -9`` loses the tails held in memory, so the windows spanning
them -- at most ``window / stride - 1`` (9 for the contract's 100/10) per turbine, plus any window queued for
scoring -- are not scored; readings after the last acknowledged one come again from the
persistent session.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from windfleet import jsonlog, payloads, topics
from windfleet import model_contract as mc
from windfleet.preprocessing import StreamWindower, prepare, raw_features

from . import capture as capture_config
from .capture import CaptureSampler
from .drift import DEFAULT_INTERVAL as DEFAULT_DRIFT_INTERVAL
from .drift import DriftTracker
from .model import LoadedModel, ModelRejected, keep_as_last_good, last_good_dir, load_model
from .shadow import MAX_OPEN_EPISODES, Shadow

COMPONENT = "com.windfleet.AnomalyDetector"
MODEL_COMPONENT = "com.windfleet.AnomalyModel"
# A canary's candidate (cloud.settings.CANARY_COMPONENT): same recipe and configuration keys as
# the model component, its artifacts beside the model's; scored in shadow (see .shadow).
CANDIDATE_COMPONENT = "com.windfleet.AnomalyModelCandidate"
MODEL_CHECK_INTERVAL = 5.0  # seconds between looks at the model component's configuration
STATE_FILE = "detector_state.json"
# A message whose samples end this far before what the windower already has is not a
# QoS1 redelivery but a stream that started over (a restarted simulator, a replaced
# sensor box): start a fresh window instead of discarding its readings as duplicates.
RESTART_BACKSTEP_WINDOWS = 10  # x the model's window size
RESTART_BACKSTEP = RESTART_BACKSTEP_WINDOWS * mc.WINDOW  # for the contract's window
FLOAT_MAX = float(np.finfo(np.float64).max)
# Windows per onnxruntime call.  Inference costs about the same per window from batch ~32 up,
# while onnxruntime's arena keeps the largest batch's activations: 256 held ~20 MB more RSS.
DEFAULT_MAX_BATCH = 128

log = logging.getLogger("windfleet.detector")

COUNTERS = (
    "messages_received", "readings_received", "readings_scored", "windows_scored", "score_batches",
    "malformed_dropped", "queue_dropped", "model_load_failures", "model_swaps", "stream_restarts",
    "windows_non_finite", "publish_errors", "score_messages", "windows_dropped_geometry",
    "drift_records", "drift_flags",
)

@dataclass
class _Chunk:
    """The windows one readings message completed for one turbine: window ``j`` is
    ``rows[j * stride : j * stride + window]`` and ends at sample ``ends[j]``."""

    turbine: str
    ends: np.ndarray  # (k,) window_end_seq
    ts: np.ndarray  # (k,) the end sample's ts
    rows: np.ndarray  # ((k - 1) * stride + window, F) raw features
    window: int
    stride: int

    @property
    def k(self) -> int:
        return len(self.ends)

    def windows(self) -> np.ndarray:
        """``(k, window, F)``, a read-only view of ``rows`` (as_strided: sliding_window_view
        costs ~90 us of argument checking per call, more than the rest of a chunk's work)."""
        row, col = self.rows.strides
        return np.lib.stride_tricks.as_strided(self.rows, (self.k, self.window, self.rows.shape[1]),
                                               (row * self.stride, row, col), writeable=False)

    def split(self, n: int) -> tuple["_Chunk", "_Chunk"]:
        w, s = self.window, self.stride
        return (_Chunk(self.turbine, self.ends[:n], self.ts[:n], self.rows[: (n - 1) * s + w], w, s),
                _Chunk(self.turbine, self.ends[n:], self.ts[n:], self.rows[n * s:], w, s))

    def to_json(self) -> dict:
        return {"turbine": self.turbine, "ends": self.ends.tolist(), "ts": self.ts.tolist(),
                "rows": self.rows.tolist(), "window": self.window, "stride": self.stride}

    @classmethod
    def from_json(cls, d: dict) -> "_Chunk":
        if "raw" in d:  # a state file of the one-window-per-item detector
            rows = np.asarray(d["raw"], dtype=np.float64).reshape(-1, len(mc.FEATURES))
            return cls(d["turbine"], np.array([int(d["end_seq"])]), np.array([float(d["ts"])]), rows, len(rows), 1)
        rows = np.asarray(d["rows"], dtype=np.float64).reshape(-1, len(mc.FEATURES))
        chunk = cls(d["turbine"], np.asarray(d["ends"], dtype=np.int64), np.asarray(d["ts"], dtype=np.float64),
                    rows, int(d["window"]), int(d["stride"]))
        if len(rows) != (chunk.k - 1) * chunk.stride + chunk.window or len(chunk.ts) != chunk.k:
            raise ValueError("saved windows are inconsistent")
        return chunk


class _WindowQueue:
    """A FIFO of :class:`_Chunk` bounded by the windows it holds (a message may complete
    one window or a hundred: the bound is on memory, not on messages).  Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.windows = 0
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._cond = threading.Condition()

    def qsize(self) -> int:
        """Windows queued."""
        return self.windows

    def put(self, chunk: _Chunk, timeout: float) -> bool:
        """Queue ``chunk``, waiting up to ``timeout`` for room; False when there was none.
        An empty queue takes any chunk, so one message's windows always fit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.windows and self.windows + chunk.k > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._chunks.append(chunk)
            self.windows += chunk.k
            self._cond.notify_all()
            return True

    def take(self, max_windows: int, timeout: float = 0.0) -> list[_Chunk]:
        """Up to ``max_windows`` windows, oldest first (the last chunk split if need be);
        waits up to ``timeout`` for the first."""
        with self._cond:
            if not self._chunks and timeout > 0:
                self._cond.wait_for(lambda: bool(self._chunks), timeout)
            out, n = [], 0
            while self._chunks and n < max_windows:
                chunk = self._chunks.popleft()
                if n + chunk.k > max_windows:
                    chunk, rest = chunk.split(max_windows - n)
                    self._chunks.appendleft(rest)
                out.append(chunk)
                n += chunk.k
            if n:
                self.windows -= n
                self._cond.notify_all()
            return out

    def take_all(self) -> list[_Chunk]:
        return self.take(self.windows or 1)


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


class Detector:
    """Scores the readings of ``turbines`` with ``model`` and publishes scores on ``bus``.

    Use :meth:`handle` as the bus handler (or call :meth:`subscribe`), run
    :meth:`serve` on a thread of your own until a stop event, then :meth:`shutdown`.
    :meth:`score_available` scores one batch synchronously (tests, benchmarks).
    """

    def __init__(self, bus, model: LoadedModel | None, turbines: Iterable[str], work_dir: str | os.PathLike, *,
                 max_batch: int = DEFAULT_MAX_BATCH, queue_size: int = 1024, put_timeout: float = 1.0,
                 health_interval: float = 10.0, score_qos: int = 1, capture: dict | None = None,
                 drift_interval: float = DEFAULT_DRIFT_INTERVAL):
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
        # the geometry the windowers cut: the model's (the contract's until there is a model)
        self._window, self._stride = (model.window, model.stride) if model is not None else (mc.WINDOW, mc.STRIDE)
        self._windowers = {t: StreamWindower(self._window, self._stride) for t in self.turbines}
        self._last_end: dict[str, int] = {}
        self._queue = _WindowQueue(queue_size)
        self._overflow: list[_Chunk] = []  # windows cut while shutting down (scoring stopped)
        self._stopping = False
        self._swap_lock = threading.Lock()
        self._windowers_lock = threading.Lock()  # the handler vs a swap that changes the geometry
        self._score_lock = threading.Lock()  # one scorer at a time: the scoring thread or a swap
        self._counter_lock = threading.Lock()
        self._limited = jsonlog.RateLimited(log, interval=60.0)
        self._next_health = 0.0
        self._locate_model = None
        self._model_check = threading.Event()
        self._next_model_check = 0.0
        self._locate_candidate = None
        self._shadow: Shadow | None = None
        self._labels: dict[str, collections.deque[tuple[int, int]]] = {}  # turbine -> its latest labelled episodes
        self._shadow_source: Path | None = None  # the candidate dir the shadow was made from
        # windows kept for retraining (.capture); None: capture off
        self._capture = CaptureSampler(bus, self.thing, **capture) if capture is not None else None
        # per-turbine input drift against the model card's reference (.drift), published every drift_interval
        self.drift = DriftTracker(self.turbines, drift_interval, self._bump)

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

    def follow_candidate(self, locate) -> None:
        """Score ``locate()`` (a candidate model dir or None) in shadow whenever it names one;
        checked with the model (:meth:`follow_model`).  None (the candidate withdrawn: the canary
        promoted or aborted) stops the shadow."""
        self._locate_candidate = locate
        self._model_check.set()

    @property
    def shadow(self) -> Shadow | None:
        return self._shadow

    def check_model_soon(self, *_: Any) -> None:
        self._model_check.set()

    def _check_model(self) -> None:
        now = time.monotonic()
        if (self._locate_model is None and self._locate_candidate is None) or \
                (not self._model_check.is_set() and now < self._next_model_check):
            return
        self._model_check.clear()
        self._next_model_check = now + MODEL_CHECK_INTERVAL
        if self._locate_candidate is not None:
            self._check_candidate()
        if self._locate_model is None:
            return
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

    def _check_candidate(self) -> None:
        try:
            wanted = self._locate_candidate()
        except Exception:  # noqa: BLE001 - not deployed (GetConfiguration: ResourceNotFound): no canary
            wanted = None
        if wanted is None:
            if self._shadow is not None:
                jsonlog.event(log, "shadow stopped: candidate withdrawn", **self._shadow.stats())
                self._shadow, self._shadow_source = None, None
            return
        wanted = Path(wanted).resolve()
        if wanted != self._shadow_source:
            self.shadow_candidate(wanted)

    def shadow_candidate(self, model_dir: str | os.PathLike | None) -> Shadow | None:
        """Load ``model_dir`` (same checks as any model) and score it in shadow from the next
        batch; None stops the shadow.  A rejected candidate, or one cut for another window
        geometry, is refused: reported in health as one shadow error with the reason (which
        aborts the canary), never a crash, and the current model keeps scoring."""
        if model_dir is None:
            self._shadow, self._shadow_source = None, None
            return None
        current = self.model_version or "none"
        try:
            candidate = load_model(model_dir)
        except ModelRejected as exc:
            shadow = Shadow(None, current, version=exc.version, refused=f"candidate rejected: {exc.reason}")
        else:
            if (candidate.window, candidate.stride) != (self._window, self._stride):
                shadow = Shadow(None, current, version=candidate.version,
                                refused=f"candidate window {candidate.window}/{candidate.stride} is not the "
                                        f"current model's {self._window}/{self._stride}: no shadow on other windows")
            else:
                shadow = Shadow(candidate, current)
                # the episodes labelled so far: turbines known to publish labels count clean windows
                # (the false-alarm gate) from the first batch, not from their next label
                for turbine, episodes in list(self._labels.items()):
                    for start, end in list(episodes):
                        shadow.label(turbine, start, end)
        self._shadow, self._shadow_source = shadow, Path(model_dir).resolve()
        jsonlog.event(log, "shadow refused" if shadow.refused else "shadow started",
                      logging.ERROR if shadow.refused else logging.INFO, candidate_version=shadow.candidate_version,
                      model_version=current, reason=shadow.refused)
        return shadow

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
            old = self._model
            self._install(new)
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

    def _install(self, new: LoadedModel) -> None:
        """Make ``new`` the scoring model.  Same window geometry: one reference swap (the
        scoring loop reads it once per batch).  Another geometry: with the handler held off,
        score everything queued with the old model, then re-cut the windowers for the new one."""
        if (new.window, new.stride) == (self._window, self._stride):
            self._model = new
            return
        with self._windowers_lock, self._score_lock:
            old = self._model
            pending = self._queue.take_all()
            if old is not None:
                batch: list[_Chunk] = []
                for chunk in pending:
                    batch.append(chunk)
                    if sum(c.k for c in batch) >= self.max_batch or chunk is pending[-1]:
                        self.score_windows(batch)
                        batch = []
            elif pending:
                self._bump("windows_dropped_geometry", sum(c.k for c in pending))
                jsonlog.event(log, "windows cut for another window size dropped", logging.WARNING,
                              windows=sum(c.k for c in pending))
            self._model = new
            self._window, self._stride = new.window, new.stride
            self._windowers = {t: w.resized(new.window, new.stride) for t, w in self._windowers.items()}
            jsonlog.event(log, "window geometry changed", window=new.window, stride=new.stride,
                          shape=list(new.shape), old_model_version=old.version if old else None)

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
            counters = dict(self.counters)
        if self._capture is not None:
            counters.update(self._capture.counters)
        return counters

    def health(self) -> dict:
        extra: dict[str, Any] = {"model_version": self.model_version, "malformed_by_kind": dict(self.malformed),
                                 "queue_depth": self._queue.qsize(), "turbines": len(self.turbines)}
        if self.reason:
            extra.update(reason=self.reason, failed_model_version=self.failed_model_version)
        shadow = self._shadow
        if shadow is not None:
            extra["shadow"] = shadow.stats()
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
            self.bus.subscribe(topics.labels(turbine), self.handle_label)

    def handle_label(self, topic: str, payload: bytes) -> None:
        """Bus handler for the simulator's labelled episodes (recall in shadow).  Never raises."""
        shadow, capture = self._shadow, self._capture
        try:
            obj = payloads.validate_label(payloads.decode(bytes(payload) if not isinstance(payload, str)
                                                          else payload))
            self._labels.setdefault(obj["turbine_id"], collections.deque(maxlen=MAX_OPEN_EPISODES)).append(
                (obj["start_seq"], obj["end_seq"]))
            if capture is not None:  # captured windows carry the label
                capture.label(obj["turbine_id"], obj["start_seq"], obj["end_seq"])
            if shadow is not None and shadow.active:
                shadow.label(obj["turbine_id"], obj["start_seq"], obj["end_seq"])
        except Exception as exc:  # noqa: BLE001 - a bad label costs a recall sample, nothing else
            self._drop("bad_label", f"{type(exc).__name__}: {exc}"[:200], topic)

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
        if turbine not in self._windowers:
            raise payloads.MalformedPayload("unknown_turbine", turbine)
        obj = payloads.decode(bytes(payload) if not isinstance(payload, str) else payload, payloads.BATCH_VERSIONS)
        table = payloads.readings_table(obj)  # (n, SAMPLE_FIELDS): the whole batch checked at once
        if obj["turbine_id"] != turbine:
            raise payloads.MalformedPayload("turbine_mismatch", f"{obj['turbine_id']!r} on {topic}")
        seq = obj["seq"]
        with np.errstate(all="ignore"):
            rows = raw_features({k: table[:, j] for j, k in enumerate(payloads.SAMPLE_FIELDS)})
        if not np.isfinite(rows).all():
            raise payloads.MalformedPayload("non_finite", "features overflow")
        # readings inside a labelled anomaly episode are a fault, not the turbine's normal: kept out of drift
        self.drift.update(self._model, turbine, seq, rows, tuple(self._labels.get(turbine, ())))
        with self._windowers_lock:
            windower = self._windowers[turbine]
            backstep = RESTART_BACKSTEP_WINDOWS * windower.window
            if windower.next_seq is not None and seq + len(rows) <= windower.next_seq - backstep:
                # The stream started over; see RESTART_BACKSTEP_WINDOWS.
                windower = self._windowers[turbine] = StreamWindower(windower.window, windower.stride)
                self._last_end.pop(turbine, None)
                self._bump("stream_restarts")
            self._bump("readings_received", len(rows))
            done = windower.push_block(seq, rows)
            if done is not None:
                ends, block = done
                self._enqueue(_Chunk(turbine, ends, table[ends - seq, 0], block, windower.window, windower.stride))

    def _enqueue(self, chunk: _Chunk) -> None:
        if self._stopping:
            self._overflow.append(chunk)  # bounded by the messages in flight; saved at shutdown
            return
        if not self._queue.put(chunk, timeout=self.put_timeout):
            self._bump("queue_dropped", chunk.k)
            self._limited.warn("queue_full", "scoring queue full; windows dropped", turbine=chunk.turbine,
                               windows=chunk.k, window_end_seq=int(chunk.ends[-1]))

    # ------------------------------------------------------------ scoring
    def score_available(self, timeout: float = 0.2) -> int:
        """Score one batch (up to ``max_batch`` queued windows, any turbines); returns its size.
        Without a model nothing is scored: windows wait in the queue for the first one."""
        if self._model is None:
            time.sleep(timeout)
            return 0
        with self._score_lock:
            chunks = self._queue.take(self.max_batch, timeout)
            if chunks:
                self.score_windows(chunks)
        return sum(c.k for c in chunks)

    def score_windows(self, chunks: list[_Chunk]) -> None:
        """Score ``chunks`` in one onnxruntime call and publish one score batch per turbine."""
        model, shadow = self._model, self._shadow  # read once: a swap takes effect between batches
        raw = np.concatenate([c.windows() for c in chunks]) if len(chunks) > 1 else chunks[0].windows()
        t0 = time.perf_counter()
        with np.errstate(all="ignore"):
            x = prepare(raw, model.statistics, model.shape)
            errors = model.run(x)
        seconds = time.perf_counter() - t0
        bad = ~np.isfinite(errors)
        if bad.any():
            # Absurd but finite input can overflow the squares; such a window is anomalous, and
            # NaN/inf cannot travel in JSON.
            self._bump("windows_non_finite", int(bad.any(axis=1).sum()))
            errors = np.where(bad, FLOAT_MAX, errors)
        per_turbine: dict[str, list[tuple[_Chunk, np.ndarray]]] = {}
        offset = 0
        for chunk in chunks:
            per_turbine.setdefault(chunk.turbine, []).append((chunk, errors[offset:offset + chunk.k]))
            offset += chunk.k
        thresholds = [model.thresholds[f] for f in mc.FEATURES]
        scored = messages = 0
        for turbine, parts in per_turbine.items():
            ends = np.concatenate([c.ends for c, _ in parts]) if len(parts) > 1 else parts[0][0].ends
            ts = np.concatenate([c.ts for c, _ in parts]) if len(parts) > 1 else parts[0][0].ts
            errs = np.concatenate([e for _, e in parts]) if len(parts) > 1 else parts[0][1]
            ends = ends.tolist()
            scored += self._readings_scored(turbine, ends, parts[0][0].window)
            body = payloads.score_batch(turbine, model.version, mc.FEATURES, thresholds, ends, ts.tolist(), errs)
            try:
                self.bus.publish(topics.scores(turbine), body, qos=self.score_qos)
                messages += 1
            except Exception as exc:
                self._bump("publish_errors")
                self._limited.warn("publish", "cannot publish scores", error=repr(exc)[:200])
        if self._capture is not None:  # after publishing, like the shadow: capture never delays scores
            start = 0
            for chunk in chunks:
                self._capture.offer(chunk.turbine, model.version, mc.FEATURES, thresholds, chunk.windows(),
                                    chunk.ends, chunk.ts, errors[start:start + chunk.k])
                start += chunk.k
        if shadow is not None and shadow.active:  # after publishing: the shadow never delays scores
            shadow.score(raw, errors, np.asarray(thresholds), seconds, [(c.turbine, c.ends) for c in chunks],
                         chunks[0].window)
        with self._counter_lock:
            self.counters["windows_scored"] += offset
            self.counters["readings_scored"] += scored
            self.counters["score_batches"] += 1
            self.counters["score_messages"] += messages

    def _readings_scored(self, turbine: str, ends: list[int], window: int) -> int:
        """Readings newly covered by windows ending at ``ends`` (each reading counted once;
        a window that does not follow the last one, e.g. after a restart, counts whole)."""
        last = self._last_end.get(turbine)
        scored = 0
        for end in ends:  # a few per turbine and batch: plain Python beats NumPy's call overhead
            step = window if last is None or end <= last else end - last
            scored += step if step < window else window
            last = end
        self._last_end[turbine] = last
        return scored

    def serve(self, stop: threading.Event) -> None:
        """Score until ``stop`` is set, publishing health every ``health_interval`` seconds."""
        while not stop.is_set():
            self._check_model()
            self.score_available(timeout=0.2)
            now = time.monotonic()
            if now >= self._next_health:
                self._next_health = now + self.health_interval
                self.publish_health()
            if self.drift.due(now):
                self.drift.publish(self.bus, self._model, qos=self.score_qos)

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
        pending = self._queue.take_all() + list(self._overflow)
        return self.save_state(pending)

    def save_state(self, pending: list[_Chunk] = ()) -> Path:
        state = {
            "schema_version": 1,
            "model_version": self.model_version,
            "windowers": {t: w.state() for t, w in self._windowers.items() if w.next_seq is not None},
            "last_end": dict(self._last_end),
            "pending": [p.to_json() for p in pending],
        }
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
        jsonlog.event(log, "state saved", turbines=len(state["windowers"]), pending_windows=sum(p.k for p in pending))
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
                    # saved for another window size: the tail is carried over (StreamWindower.resized)
                    self._windowers[turbine] = StreamWindower.from_state(wstate, self._window, self._stride)
                    resumed += 1
            self._last_end.update({t: int(e) for t, e in state.get("last_end", {}).items() if t in self._windowers})
            chunks = [_Chunk.from_json(p) for p in state.get("pending", []) if p["turbine"] in self._windowers]
            for chunk in chunks:
                if (chunk.window, chunk.stride if chunk.k > 1 else self._stride) == (self._window, self._stride):
                    self._enqueue(chunk)
                else:  # cut for a model of another window size: this model cannot score them
                    self._bump("windows_dropped_geometry", chunk.k)
        except Exception as exc:  # a damaged state file costs one window per turbine, not the detector
            jsonlog.event(log, "cannot restore the saved windows; starting fresh", logging.WARNING,
                          error=repr(exc)[:200])
            self._windowers = {t: StreamWindower(self._window, self._stride) for t in self.turbines}
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


def model_locator(bus, models_root: str | os.PathLike, component: str = MODEL_COMPONENT) -> Any:
    """A function giving the model dir ``component``'s configuration names: the version under
    ``models_root`` (``{kernel:rootPath}/packages/artifacts/<component>``) whose card carries the
    configured ``OnnxSha256`` (and ``ModelVersion``); None while nothing matches.  The same
    for the model and the canary's candidate (:data:`CANDIDATE_COMPONENT`)."""
    root = Path(models_root)

    def locate() -> Path | None:
        config = bus.get_configuration(component)
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
    else the last good one kept in ``work_dir``.  With ``models_root``, a canary's candidate
    (:data:`CANDIDATE_COMPONENT`, its versions beside the model's) is followed too and scored
    in shadow while it is deployed (:meth:`Detector.follow_candidate`).  Without any, the detector runs, keeps
    windows queued and scores from the first model that arrives.

    Configuration keys (component configuration, overridden by arguments):
    ``turbines`` (count or ids), ``model_dir``, ``max_batch``, ``queue_size``,
    ``health_interval_s``; ``capture`` (true: on; off by default), ``capture_normal_fraction``,
    ``capture_max_per_minute`` (see :mod:`.capture`); ``drift_interval_s`` (see :mod:`.drift`).
    """
    stop = stop or threading.Event()
    config = bus.get_configuration() or {}
    model_dir = model_dir or config.get("model_dir")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ids = turbine_ids(bus.thing_name, turbines if turbines is not None else config.get("turbines", 1))
    settings = {
        "max_batch": int(config.get("max_batch", DEFAULT_MAX_BATCH)),
        "queue_size": int(config.get("queue_size", 1024)),
        "health_interval": float(config.get("health_interval_s", 10.0)),
        "drift_interval": float(config.get("drift_interval_s", DEFAULT_DRIFT_INTERVAL)),
        "capture": capture_config.settings(config),
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
        # the candidate's versions sit beside the model's: .../artifacts/<CANDIDATE_COMPONENT>
        detector.follow_candidate(model_locator(bus, Path(models_root).parent / CANDIDATE_COMPONENT,
                                                CANDIDATE_COMPONENT))
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
