"""Data capture: the detector keeps a bounded sample of raw windows for retraining.

Policy (:class:`CaptureSampler`), per scored window:

* every FLAGGED window (the model alarmed: ``max(error / threshold) > 1``) is kept,
  reason ``flagged``;
* a NORMAL window is kept with probability ``normal_fraction``, reason ``sampled``;
* per turbine at most ``max_per_minute`` windows a minute go out (a token bucket, so an
  alarm storm cannot flood the bus or the forwarder's spool): flagged windows take the
  tokens first, and whatever the bound refuses is counted in ``capture_dropped``.

Each kept window goes out as one ``payloads.capture`` message on ``topics.capture(thing)``
with its raw rows (the model's inputs before ``prepare``: what the scoring queue holds),
the model version, per-feature errors and thresholds.  ``label``: 1 when the window
overlaps a labelled anomaly episode (the simulator's ``topics.labels``) or the turbine's
recovery after one (``payloads.LABEL_RECOVERY_SAMPLES``), 0 once labels are
being received for that turbine and it overlaps none, None while none have arrived.

Publishing is synchronous on the scoring thread (about 0.5 ms a message); the bound keeps
that below ``max_per_minute / 60 * 0.5 ms`` per turbine and second.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from windfleet import jsonlog, payloads, topics

log = logging.getLogger("windfleet.detector.capture")

DEFAULT_NORMAL_FRACTION = 0.02
DEFAULT_MAX_PER_MINUTE = 60
MAX_EPISODES = 64  # labelled episodes remembered per turbine (older ones are long scored)
COUNTERS = ("windows_captured", "capture_flagged", "capture_sampled", "capture_dropped", "capture_publish_errors")


def settings(config: dict) -> dict | None:
    """The detector configuration's capture keys -> :class:`CaptureSampler` arguments, or
    None unless ``capture`` is true.  ValueError for a value out of range."""
    enabled = config.get("capture", False)  # opt-in: see the detector recipe
    if isinstance(enabled, str):
        enabled = enabled.strip().lower() not in ("false", "0", "no", "off", "")
    if not enabled:
        return None
    fraction = float(config.get("capture_normal_fraction", DEFAULT_NORMAL_FRACTION))
    per_minute = float(config.get("capture_max_per_minute", DEFAULT_MAX_PER_MINUTE))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"capture_normal_fraction must be within [0, 1], not {fraction}")
    if per_minute < 0:
        raise ValueError(f"capture_max_per_minute must be >= 0, not {per_minute}")
    return {"normal_fraction": fraction, "max_per_minute": per_minute}


class _Bucket:
    """A token bucket: ``rate`` tokens a minute, at most ``rate`` held (a minute's worth)."""

    def __init__(self, per_minute: float, now: float):
        self.capacity = per_minute
        self.tokens = per_minute
        self.stamp = now

    def take(self, n: int, now: float) -> int:
        """Take up to ``n`` tokens; returns how many were granted."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now
        granted = min(n, int(self.tokens))
        self.tokens -= granted
        return granted


class CaptureSampler:
    """Chooses the windows to keep and publishes them.  :meth:`offer` runs on the scoring
    thread, :meth:`label` on the bus thread (one lock around the episodes)."""

    def __init__(self, bus, thing: str, *, normal_fraction: float = DEFAULT_NORMAL_FRACTION,
                 max_per_minute: float = DEFAULT_MAX_PER_MINUTE, seed: int | None = None,
                 clock=time.monotonic):
        self.bus, self.thing = bus, thing
        self.normal_fraction, self.max_per_minute = normal_fraction, max_per_minute
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._episodes: dict[str, collections.deque[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._limited = jsonlog.RateLimited(log, interval=60.0)

    # ------------------------------------------------------------ labels
    def label(self, turbine: str, start: int, end: int) -> None:
        """A labelled anomaly episode (samples ``start <= seq < end``) on ``turbine``."""
        with self._lock:
            self._episodes.setdefault(turbine, collections.deque(maxlen=MAX_EPISODES)).append((int(start), int(end)))

    def label_of(self, turbine: str, end: int, window: int) -> int | None:
        """1/0/None for the window of ``window`` samples ending at sample ``end`` (see module)."""
        with self._lock:
            episodes = self._episodes.get(turbine)
            if episodes is None:
                return None
            # the turbine's recovery after an episode is no normal data to learn from either
            return int(any(payloads.in_episode(end, window, s, e, payloads.LABEL_RECOVERY_SAMPLES)
                           for s, e in episodes))

    # ------------------------------------------------------------ sampling
    def choose(self, turbine: str, flagged: np.ndarray) -> list[tuple[int, str]]:
        """``(index, reason)`` of the windows to keep among ``flagged`` (one bool per window,
        oldest first), after the per-minute bound; counts what the bound refused."""
        flagged = np.asarray(flagged, dtype=bool)
        wanted = np.flatnonzero(flagged | (self._rng.random(len(flagged)) < self.normal_fraction))
        if not len(wanted):
            return []
        bucket = self._buckets.get(turbine)
        now = self._clock()
        if bucket is None:
            bucket = self._buckets[turbine] = _Bucket(self.max_per_minute, now)
        granted = bucket.take(len(wanted), now)
        if granted < len(wanted):
            # flagged first (stable: oldest first within each kind)
            wanted = wanted[np.argsort(~flagged[wanted], kind="stable")]
            self.counters["capture_dropped"] += len(wanted) - granted
            self._limited.warn("capture_bound", "capture bound reached; windows not captured", turbine=turbine,
                               dropped=len(wanted) - granted, max_per_minute=self.max_per_minute)
            wanted = np.sort(wanted[:granted])
        return [(int(i), "flagged" if flagged[i] else "sampled") for i in wanted]

    def offer(self, turbine: str, model_version: str, features: Sequence[str], thresholds: Sequence[float],
              windows: np.ndarray, ends: Sequence[int], ts: Sequence[float], errors: np.ndarray) -> int:
        """One turbine's scored windows: ``windows`` ``(k, window, F)`` raw rows, ``errors``
        ``(k, F)``.  Publishes the kept ones; returns how many.  Never raises."""
        limits = np.asarray(thresholds, dtype=np.float64)
        flagged = (errors / limits).max(axis=1) > 1.0
        kept = 0
        for i, reason in self.choose(turbine, flagged):
            try:
                body = payloads.capture(self.thing, turbine, model_version, float(ts[i]), int(ends[i]), features,
                                        windows[i], errors[i], limits, reason,
                                        self.label_of(turbine, int(ends[i]), windows.shape[1]))
                self.bus.publish(topics.capture(self.thing), body, qos=1)
            except Exception as exc:  # noqa: BLE001 - a lost capture never stops scoring
                self.counters["capture_publish_errors"] += 1
                self._limited.warn("capture_publish", "cannot publish a captured window", error=repr(exc)[:200])
                continue
            kept += 1
            self.counters["windows_captured"] += 1
            self.counters["capture_flagged" if reason == "flagged" else "capture_sampled"] += 1
        return kept

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
