"""The detector's drift monitoring: one :class:`windfleet.drift.DriftMonitor` per turbine against
the current model's card, and one ``payloads.drift`` record per turbine every interval.

The readings handler feeds each accepted message's raw features (:meth:`DriftTracker.update`,
a few microseconds per message); the scoring thread publishes (:meth:`DriftTracker.publish`).
A model whose card has no ``drift`` object (trained before drift monitoring) means no drift
records, never an error; an unusable one is logged once per model and treated the same.  A new
model brings a new reference: every monitor is rebuilt against it from the turbine's last window
of raw readings (kept beside the histograms), so a record always compares readings with the
training data of the model named in it, and a rollout is judged on the turbine's data at once
rather than after a window of fresh readings (e.g. 600 at 20 Hz, outside faults: about a minute).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from windfleet import jsonlog, payloads, topics
from windfleet.drift import DriftCardError, DriftMonitor, Reference

DEFAULT_INTERVAL = 10.0  # seconds between drift records (recipe configuration drift_interval_s)

log = logging.getLogger("windfleet.detector")


class DriftTracker:
    """Drift monitors of ``turbines`` for whichever model :meth:`update`/:meth:`publish` are given."""

    def __init__(self, turbines: Iterable[str], interval: float = DEFAULT_INTERVAL,
                 bump: Callable[[str, int], None] | None = None):
        self.turbines = list(turbines)
        self.interval = float(interval)
        self._bump = bump or (lambda name, n=1: None)
        self._model: Any = None  # the model whose reference the monitors use
        self.reference: Reference | None = None
        self.monitors: dict[str, DriftMonitor] = {}
        self._recent: dict[str, np.ndarray] = {}  # per turbine: the raw readings its window holds
        self._lock = threading.Lock()
        self._next = time.monotonic() + self.interval
        self._limited = jsonlog.RateLimited(log, interval=60.0)

    def _follow(self, model: Any) -> Reference | None:
        """The reference of ``model``'s card, (re)building every monitor when the model changed."""
        if model is self._model:
            return self.reference
        with self._lock:
            if model is self._model:
                return self.reference
            reference = None
            if model is not None:
                try:
                    reference = Reference.from_card(model.card)
                except DriftCardError as exc:
                    jsonlog.event(log, "model card's drift reference unusable; no drift monitoring",
                                  logging.WARNING, model_version=model.version, reason=str(exc))
            same_features = self._model is not None and model is not None and \
                self._model.card.get("features") == model.card.get("features")
            self.monitors = {}
            for turbine in self.turbines if reference is not None else ():
                monitor = self.monitors[turbine] = DriftMonitor(reference)
                recent = self._recent.get(turbine) if same_features else None
                if recent is not None and len(recent):
                    monitor.update(recent[-reference.samples:])
            if not same_features:
                self._recent = {}
            self.reference, self._model = reference, model
            return reference

    def update(self, model: Any, turbine: str, seq: int, rows: np.ndarray,
               episodes: Iterable[tuple[int, int]] = ()) -> None:
        """Count one accepted readings message's raw features ``(n, F)``, leaving out the readings
        inside labelled anomaly ``episodes`` (``start <= seq < end``, plus the recovery after each:
        ``payloads.LABEL_RECOVERY_SAMPLES``): a fault is not drift, and
        a simulated fleet with frequent faults would otherwise look drifted.  Never raises."""
        try:
            if self._follow(model) is None:
                return
            # the turbine's recovery after a fault is not its normal either
            recovery = payloads.LABEL_RECOVERY_SAMPLES
            last, n = seq + len(rows) - 1, len(rows)  # the message as one window of its readings
            touching = [(a, b) for a, b in episodes if payloads.in_episode(last, n, a, b, recovery)]
            if touching:
                at = seq + np.arange(len(rows))
                inside = np.zeros(len(rows), dtype=bool)
                for a, b in touching:
                    inside |= payloads.in_episode(at, 1, a, b, recovery)
                rows, seq = rows[~inside], None  # not contiguous any more: no redelivery check for it
            monitor = self.monitors.get(turbine)
            if monitor is not None:
                new = monitor.update(rows, seq)
                if new:  # the next model's monitor starts from these
                    recent = self._recent.get(turbine)
                    rows = rows[len(rows) - new:]
                    self._recent[turbine] = (rows if recent is None else np.concatenate([recent, rows])
                                             )[-monitor.reference.samples:]
        except Exception as exc:  # noqa: BLE001 - drift is advisory: it never costs a reading its score
            self._limited.warn("drift_update", "drift update failed", error=repr(exc)[:200])

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def records(self, model: Any, ts: float | None = None) -> list[tuple[str, dict]]:
        """``(turbine, payloads.drift)`` for every turbine whose window has filled once."""
        if self._follow(model) is None:
            return []
        with self._lock:  # one consistent (model, reference, monitors) even while a swap rebuilds them
            model, reference, monitors = self._model, self.reference, self.monitors
        if reference is None:
            return []
        ts = time.time() if ts is None else ts
        return [(turbine, payloads.drift(turbine, model.version, ts, monitor.samples, monitor.score(),
                                         reference.thresholds))
                for turbine, monitor in monitors.items() if monitor.ready]

    def publish(self, bus, model: Any, qos: int = 1) -> int:
        """Publish the due records on ``topics.drift``; returns how many went out.  Never raises."""
        sent = 0
        try:
            records = self.records(model)
        except Exception as exc:  # noqa: BLE001
            self._limited.warn("drift_score", "drift scoring failed", error=repr(exc)[:200])
            return 0
        for turbine, record in records:
            try:
                bus.publish(topics.drift(turbine), record, qos=qos)
                sent += 1
                if record["drifted"]:
                    self._bump("drift_flags", 1)
            except Exception as exc:  # noqa: BLE001
                self._bump("publish_errors", 1)
                self._limited.warn("drift_publish", "cannot publish drift", error=repr(exc)[:200])
        self._bump("drift_records", sent)
        return sent
