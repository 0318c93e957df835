"""Shadow scoring: a canary's candidate model scores the same windows as the current model.

On a canary gateway the candidate arrives as a second model component
(``com.windfleet.AnomalyModelCandidate``, see ``cloud/canary.py``).  The detector loads it
with the same checks as any model (``model.load_model``) and hands every batch the
current model scored to :meth:`Shadow.score`: the candidate scores the same raw windows
(prepared with *its* card's statistics), nothing it flags is published, and the
comparison accumulates here.  :meth:`Shadow.stats` is ``payloads.shadow_stats``, carried
in the detector's health.

Memory is fixed whatever the run length: counters, two log-spaced histograms per model
(window score, inference cost) and a few open labelled episodes per turbine.

A window's *score* is its largest feature error over that feature's threshold (> 1 means
flagged), so the quantiles of two models with different thresholds compare.

A candidate whose window geometry differs from the current model's is refused (reported
as one error with the reason, which aborts the canary): the same windows are what make
the agreement figure mean something.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from windfleet import model_contract as mc
from windfleet import payloads
from windfleet.preprocessing import prepare

from .model import LoadedModel

# log10 bins: scores 1e-3 .. 1e3 (x threshold), inference 1e-4 .. 1e3 ms per window
_SCORE_EDGES = np.arange(-3.0, 3.0 + 1e-9, 0.025)
_INFER_EDGES = np.arange(-4.0, 3.0 + 1e-9, 0.025)
MAX_OPEN_EPISODES = 32  # per turbine; labels beyond these (a flood) are dropped oldest first
# A window is judged clean (outside every labelled episode) only once the turbine's stream is this
# many samples past it: a label published just before its readings can still be handled after
# them on a busy device (another subscription), and must not make a fault look like a false alarm.
SETTLE_SAMPLES = 200


class _Histogram:
    """Counts over fixed log10 bins (plus under/overflow): bounded, mergeable, quantiles to ~6 %."""

    def __init__(self, edges: np.ndarray):
        self.edges = edges
        self.counts = np.zeros(len(edges) + 1, dtype=np.int64)

    def add(self, values: np.ndarray, weight: int = 1) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            idx = np.searchsorted(self.edges, np.log10(np.maximum(values, 1e-300)))
        self.counts += np.bincount(idx, minlength=len(self.counts)) * weight

    def quantile(self, q: float) -> float:
        total = int(self.counts.sum())
        if not total:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), q * total))
        if i == 0:
            return float(10 ** self.edges[0])
        if i >= len(self.edges):
            return float(10 ** self.edges[-1])
        return float(10 ** ((self.edges[i - 1] + self.edges[i]) / 2))  # the bin's geometric middle


@dataclass
class _Side:
    """One model's figures."""

    alarms: int = 0
    scores: _Histogram = field(default_factory=lambda: _Histogram(_SCORE_EDGES))
    infer: _Histogram = field(default_factory=lambda: _Histogram(_INFER_EDGES))

    def add(self, flagged: np.ndarray, scores: np.ndarray, seconds: float) -> None:
        self.alarms += int(flagged.sum())
        self.scores.add(scores)
        self.infer.add(np.array([seconds * 1000.0 / len(scores)]), weight=len(scores))

    def stats(self, windows: int) -> dict:
        return {"alarms": self.alarms, "alarm_rate": self.alarms / windows if windows else 0.0,
                "score_p50": self.scores.quantile(0.5), "score_p90": self.scores.quantile(0.9),
                "score_p99": self.scores.quantile(0.99), "infer_ms_p50": self.infer.quantile(0.5),
                "infer_ms_p99": self.infer.quantile(0.99)}


@dataclass
class _Episode:
    start: int  # first sample
    end: int  # first sample after it
    counted: bool = False
    current: bool = False
    candidate: bool = False


def window_scores(errors: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per window: the largest feature error over its threshold (> 1: flagged)."""
    return (errors / thresholds).max(axis=1)


class Shadow:
    """The candidate and what it measured since it was loaded.  ``score`` runs on the scoring
    thread; ``stats`` and ``label`` on others (one lock around the counters)."""

    def __init__(self, candidate: LoadedModel | None, current_version: str, *, version: str | None = None,
                 refused: str | None = None):
        self.candidate = candidate
        self.candidate_version = version or (candidate.version if candidate is not None else "unknown")
        self.current_version = current_version
        self.refused = refused
        self.since = time.time()
        self.windows = self.either = self.both = 0
        self.errors = 1 if refused else 0
        self.last_error: str | None = refused
        self.current, self.cand = _Side(), _Side()
        self.labelled = self.current_detected = self.candidate_detected = 0
        self.clean = self.current_false = self.candidate_false = 0  # windows outside labelled episodes
        self._episodes: dict[str, collections.deque[_Episode]] = {}
        self._unsettled: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._lock = threading.Lock()
        if candidate is not None:
            self._thresholds = np.array([candidate.thresholds[f] for f in mc.FEATURES])

    @property
    def active(self) -> bool:
        return self.candidate is not None and not self.refused

    @property
    def model_dir(self):
        return self.candidate.model_dir if self.candidate is not None else None

    def label(self, turbine: str, start: int, end: int) -> None:
        """A labelled anomaly episode (samples ``start <= seq < end``) on ``turbine``."""
        with self._lock:
            self._episodes.setdefault(turbine, collections.deque(maxlen=MAX_OPEN_EPISODES)).append(
                _Episode(int(start), int(end)))

    def score(self, raw: np.ndarray, current_errors: np.ndarray, current_thresholds: np.ndarray,
              current_seconds: float, parts: Sequence[tuple[str, np.ndarray]], window: int) -> None:
        """Score ``raw`` (the batch's windows, ``(k, window, F)``) with the candidate and compare.

        ``current_errors`` ``(k, F)``: what the current model found, in ``current_seconds``;
        ``parts``: ``(turbine, window_end_seqs)`` in the batch's order (for labelled episodes).
        Never raises: a candidate failure is counted as an error, the current model's scores
        are already on their way."""
        if not self.active:
            return
        model = self.candidate
        t0 = time.perf_counter()
        try:
            with np.errstate(all="ignore"):
                errors = model.run(prepare(raw, model.statistics, model.shape))
            if errors.shape != current_errors.shape:
                raise ValueError(f"candidate errors {errors.shape} for {current_errors.shape} windows")
        except Exception as exc:  # noqa: BLE001 - a shadow failure must not touch the real scoring
            with self._lock:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return
        seconds = time.perf_counter() - t0
        errors = np.where(np.isfinite(errors), errors, np.finfo(np.float64).max)
        cur_scores = window_scores(current_errors, current_thresholds)
        cand_scores = window_scores(errors, self._thresholds)
        cur_flag, cand_flag = cur_scores > 1.0, cand_scores > 1.0
        with self._lock:
            self.windows += len(cur_flag)
            self.either += int((cur_flag | cand_flag).sum())
            self.both += int((cur_flag & cand_flag).sum())
            self.current.add(cur_flag, cur_scores, current_seconds)
            self.cand.add(cand_flag, cand_scores, seconds)
            if self._episodes:
                self._match_episodes(parts, cur_flag, cand_flag, window)

    def _match_episodes(self, parts, cur_flag, cand_flag, window) -> None:
        """Count detected episodes, and the windows of labelled turbines (ones whose simulator or
        operator publishes labels) that overlap none, nor the turbine's recovery after one
        (``payloads.LABEL_RECOVERY_SAMPLES``): there a flag is a false alarm.  A label is
        published before the readings of its first sample, so it is known when they are scored."""
        offset = 0
        for turbine, ends in parts:
            n = len(ends)
            episodes = self._episodes.get(turbine)
            if episodes is not None:
                pending = self._unsettled.setdefault(turbine, [])
                pending.append((ends, cur_flag[offset:offset + n], cand_flag[offset:offset + n]))
                horizon = int(ends[-1]) - SETTLE_SAMPLES
                while pending and int(pending[0][0][-1]) <= horizon:
                    self._count_clean(episodes, *pending.pop(0), window)
                for ep in list(episodes):
                    overlap = payloads.in_episode(ends, window, ep.start, ep.end)
                    if overlap.any():
                        if not ep.counted:
                            ep.counted, self.labelled = True, self.labelled + 1
                        if not ep.current and cur_flag[offset:offset + n][overlap].any():
                            ep.current, self.current_detected = True, self.current_detected + 1
                        if not ep.candidate and cand_flag[offset:offset + n][overlap].any():
                            ep.candidate, self.candidate_detected = True, self.candidate_detected + 1
                    if horizon - window + 1 >= ep.end + payloads.LABEL_RECOVERY_SAMPLES:
                        episodes.remove(ep)  # every window still to be counted starts past its recovery
            offset += n

    def _count_clean(self, episodes, ends: np.ndarray, cur: np.ndarray, cand: np.ndarray, window: int) -> None:
        inside = np.zeros(len(ends), dtype=bool)
        for ep in episodes:  # a window inside an episode or the turbine's recovery from it is not clean
            inside |= payloads.in_episode(ends, window, ep.start, ep.end, payloads.LABEL_RECOVERY_SAMPLES)
        clean = ~inside
        self.clean += int(clean.sum())
        self.current_false += int(cur[clean].sum())
        self.candidate_false += int(cand[clean].sum())

    def stats(self) -> dict:
        """``payloads.shadow_stats`` so far (plus ``error``: the last candidate failure, if any)."""
        with self._lock:
            out = payloads.shadow_stats(
                self.candidate_version, self.current_version, self.since, self.windows,
                self.current.stats(self.windows), self.cand.stats(self.windows), self.either, self.both,
                self.labelled, self.current_detected, self.candidate_detected, self.errors,
                self.clean, self.current_false, self.candidate_false)
        if self.last_error:
            out["error"] = self.last_error
        return out
