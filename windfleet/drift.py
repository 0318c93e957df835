"""Input drift on the device: PSI of each turbine's recent readings against the model's training data.

The model card's ``drift`` object (built at training time by :func:`reference`)::

    {"method": "psi", "bins": B, "samples": n, "segment": S, "smoothing": 0.5, "margin": m,
     "circular": [feature, ...],
     "edges": {feature: [B - 1 increasing cut points]},
     "references": {feature: [[B proportions] per reference]},
     "reference_sources": [training source (turbine) index per reference],
     "thresholds": {feature: float},
     "calibration": {"max_score": {feature: float}, "sources": int, "readings": int}}

Bins: bin ``i`` holds ``edges[i-1] <= x < edges[i]`` (the first and last bins are open-ended).
The first and last edges are the pooled training data's 0.1 % and 99.9 % quantiles, the ones
between equal-mass quantiles, so the two outer bins mean "beyond anything training saw": a
sensor offset or a wind regime no training turbine had lands there and scores high.  Tied
quantiles (e.g. rotor speed 0 while idling) are merged, so a feature may have fewer bins.
A circular feature (yaw: the nacelle follows the wind direction, which is weather, not drift)
gets ``B`` equal bins over ``[-pi, pi)`` and is compared up to a rotation (the smallest PSI over
cyclic shifts of each reference): only the shape of its distribution counts.

References: one histogram per ``S`` consecutive readings (5 minutes) of each training turbine.
A whole turbine's hour is far broader than the ``n`` readings (30 s) a device compares, so
every normal window would score high against it; a 5-minute stretch is a regime.

Score of a turbine for a feature: ``min`` over references of
``PSI(p, q) = sum_i (p_i - q_i) ln(p_i / q_i)`` where ``p`` are the proportions of its last
``n`` readings (smoothed with ``smoothing`` pseudo-counts per bin, so no bin is 0) and ``q`` a
reference's proportions (smoothed the same way at ``n`` readings).  The NEAREST reference
decides, so a turbine at any regime the model was trained on scores low.  A feature is
drifted when its score exceeds its threshold: ``margin`` x the largest score over chunks of
``n`` consecutive readings of the calibration fleet (turbines training never saw, spanning the
wind envelope), and at least :data:`MIN_THRESHOLD`.  B, n and the margin are measured in
benchmarks/README.md ("Drift").

:class:`DriftMonitor` keeps one turbine's sliding window as a ring of sub-histograms updated
per readings message (one ``np.searchsorted`` and one ``np.bincount`` for all its rows and
features): no Python per reading.  NumPy only: this module ships to devices.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "psi"
BINS = 10  # per feature: 8 equal-mass bins + the two "beyond training" bins
SAMPLES = 600  # readings per turbine in the sliding window: 30 s at 20 Hz
MARGIN = 2.0  # threshold = margin x the largest calibration score (measurements: benchmarks/README.md)
SEGMENT = 10  # a reference histogram per SEGMENT x SAMPLES readings (5 min) of a training turbine
SMOOTHING = 0.5  # pseudo-count per bin (Jeffreys): no bin is 0, an empty bin costs at most ln(2n)
TAIL = 0.001  # the outer edges: training's 0.1 % and 99.9 % quantiles
BLOCKS = 10  # sub-histograms in a monitor's ring: the window holds n - n/BLOCKS + 1 to n readings
MIN_THRESHOLD = 2.0  # never below: a turbine's own IMU mounting offset alone reaches ~1.5 (roll, pitch)
CALIBRATION_STEP = 4  # calibration chunks start every n / CALIBRATION_STEP readings
RESTART_BACKSTEP = 1000  # readings: a message this far behind the last one is a stream that started over


class DriftCardError(ValueError):
    """A card's ``drift`` object that cannot be used (one-line reason)."""


# ---------------------------------------------------------------- the measure
def proportions(counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Histogram counts ``(..., B)`` -> proportions with ``smoothing`` pseudo-counts per bin."""
    counts = np.asarray(counts, dtype=np.float64) + smoothing
    return counts / counts.sum(axis=-1, keepdims=True)


def psi(counts: np.ndarray, reference: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Population stability index of ``counts`` ``(..., B)`` (smoothed) against reference
    proportions ``(..., B)`` (no zero bins); broadcasts, sums over the last axis."""
    p = proportions(counts, smoothing)
    q = np.asarray(reference, dtype=np.float64)
    return ((p - q) * np.log(p / q)).sum(axis=-1)


def nearest_psi(counts: np.ndarray, references: np.ndarray, circular: bool = False,
                smoothing: float = SMOOTHING) -> float:
    """The smallest :func:`psi` of ``counts`` ``(B,)`` over ``references`` ``(R, B)`` (and, for a
    circular feature, over every cyclic shift of each)."""
    refs = np.asarray(references, dtype=np.float64)
    if circular:
        refs = _rotations(refs)
    return float(psi(counts, refs, smoothing).min())


def _rotations(refs: np.ndarray) -> np.ndarray:
    """``(R, B)`` -> ``(R * B, B)``: every cyclic shift of every reference."""
    b = refs.shape[-1]
    idx = (np.arange(b)[None, :] - np.arange(b)[:, None]) % b  # row s: shifted by s
    return refs[:, idx].reshape(-1, b)


# ---------------------------------------------------------------- building the card's object
def bin_edges(values: np.ndarray, bins: int = BINS, circular: bool = False) -> np.ndarray:
    """The ``bins - 1`` cut points of one feature (see the module docstring; ties merged)."""
    if circular:
        return -math.pi + 2 * math.pi * np.arange(1, bins) / bins
    inner = np.linspace(0.0, 1.0, bins - 1)[1:-1]
    qs = np.concatenate([[TAIL], TAIL + (1 - 2 * TAIL) * inner, [1 - TAIL]])
    return np.unique(np.quantile(values, qs))


def stream_rows(raw: np.ndarray, source: np.ndarray, ends: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Windows ``(k, W, F)`` -> each source's readings ``(m, F)`` in time order, each reading
    once: a window contributes only the rows after the previous window of its source (windows
    overlap), whole after a gap.  Without ``ends`` (or ``ends`` not one per window) every
    window's rows count (overlap then only reweights readings)."""
    raw = np.asarray(raw, dtype=np.float64)
    source = np.asarray(source, dtype=np.int64)
    k, w = raw.shape[:2]
    if ends is None or len(ends) != k or k == 0:
        return {int(s): raw[source == s].reshape(-1, raw.shape[2]) for s in np.unique(source)}
    order = np.lexsort((np.asarray(ends, dtype=np.int64), source))  # by source, then time
    src, ends = source[order], np.asarray(ends, dtype=np.int64)[order]
    step = np.full(k, w, dtype=np.int64)
    step[1:] = np.where(src[1:] == src[:-1], ends[1:] - ends[:-1], w)
    step = np.clip(step, 0, w)  # a repeated end (step 0) adds nothing; a gap takes the whole window
    keep = np.arange(w)[None, :] >= (w - step)[:, None]
    out = {}
    for s in np.unique(src):  # one source's windows copied at a time, not the whole training set
        mine = src == s
        out[int(s)] = raw[order[mine]][keep[mine]]
    return out


class _Binner:
    """Maps readings ``(m, F)`` to flat bin numbers ``(m, F)`` in one ``np.searchsorted``: each
    feature's values are clipped to just outside its edges and shifted into a range of its own,
    so all features share one sorted array of cut points."""

    def __init__(self, edges: Sequence[np.ndarray]):
        self.edges = [np.asarray(e, dtype=np.float64) for e in edges]
        self.sizes = np.array([len(e) + 1 for e in edges], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.total = int(self.sizes.sum())
        lo = np.array([e[0] if len(e) else 0.0 for e in edges])
        hi = np.array([e[-1] if len(e) else 0.0 for e in edges])
        pad = np.maximum(hi - lo, 1e-9)
        self.lo, self.hi = lo - pad, hi + pad  # clipped values stay in the outer bins
        # feature j's values land in [base_j, base_j + 3 * pad_j]; bases far enough apart
        width = self.hi - self.lo
        self.shift = np.concatenate([[0.0], np.cumsum(width + 1.0)[:-1]]) - self.lo
        self.cuts = np.concatenate([np.asarray(e, dtype=np.float64) + s for e, s in zip(edges, self.shift)])
        self.index = np.arange(len(edges))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        z = np.clip(rows, self.lo, self.hi) + self.shift
        # cuts below z: every cut of features before j (offsets[j] - j of them) + z's bin in j
        return np.searchsorted(self.cuts, z, side="right") + self.index

    def counts(self, rows: np.ndarray) -> np.ndarray:
        return np.bincount(self(rows).ravel(), minlength=self.total)


def reference(train_raw: np.ndarray, train_source: np.ndarray, calib_raw: np.ndarray, calib_source: np.ndarray, *,
              features: Sequence[str], circular: Sequence[int] = (), train_ends: np.ndarray | None = None,
              calib_ends: np.ndarray | None = None, bins: int = BINS, samples: int = SAMPLES,
              margin: float = MARGIN, segment: int = SEGMENT, smoothing: float = SMOOTHING) -> dict[str, Any]:
    """The card's ``drift`` object from raw training and calibration windows ``(k, W, F)`` (model
    inputs before standardisation) with each window's source (turbine) and last row.

    References: one histogram per ``segment`` x ``samples`` consecutive readings of each training
    source (a shorter source, or a last stretch of at least half that, makes one too).
    Thresholds: ``margin`` x the largest nearest-reference PSI over chunks of ``samples``
    consecutive readings of every calibration source (chunks start every
    ``samples / CALIBRATION_STEP`` readings; a source shorter than ``samples`` is one chunk).
    ValueError when there is nothing to build from."""
    train = stream_rows(train_raw, train_source, train_ends)
    calib = stream_rows(calib_raw, calib_source, calib_ends)
    if not train or not calib:
        raise ValueError("drift reference needs training and calibration windows")
    pooled = np.concatenate(list(train.values()))
    circ = {int(i) for i in circular}
    edges = [bin_edges(pooled[:, j], bins, j in circ) for j in range(len(features))]
    binner = _Binner(edges)
    span = segment * samples
    refs, owners = [], []
    for src, rows in train.items():
        for start in range(0, max(1, len(rows) - span // 2), span):
            refs.append(_smoothed_at(binner.counts(rows[start:start + span]), binner, samples, smoothing))
            owners.append(src)
    refs = np.stack(refs)
    scores = np.zeros(len(features))
    for rows in calib.values():
        for counts in _chunk_counts(binner, rows, samples):
            scores = np.maximum(scores, _nearest(binner, counts, refs, circ, smoothing))
    thresholds = np.maximum(margin * scores, MIN_THRESHOLD)
    split = lambda a: np.split(a, binner.offsets[1:], axis=-1)  # noqa: E731 - flat bins -> per feature
    return {
        "method": METHOD, "bins": int(bins), "samples": int(samples), "segment": int(span),
        "smoothing": float(smoothing), "margin": float(margin), "circular": [features[j] for j in sorted(circ)],
        "edges": {f: [float(v) for v in e] for f, e in zip(features, edges)},
        "references": {f: np.round(r, 7).tolist() for f, r in zip(features, split(refs))},
        "reference_sources": [int(o) for o in owners],
        "thresholds": {f: float(t) for f, t in zip(features, thresholds)},
        "calibration": {"max_score": {f: float(v) for f, v in zip(features, scores)},
                        "sources": len(calib), "readings": int(sum(len(r) for r in calib.values()))},
    }


def _smoothed_at(counts: np.ndarray, binner: _Binner, n: int, smoothing: float) -> np.ndarray:
    """Per feature, proportions smoothed as if from ``n`` readings (flat ``(total,)``)."""
    out = np.empty(binner.total)
    for off, size in zip(binner.offsets, binner.sizes):
        c = counts[off:off + size].astype(np.float64)
        out[off:off + size] = proportions(c / max(c.sum(), 1.0) * n, smoothing)
    return out


def _chunk_counts(binner: _Binner, rows: np.ndarray, n: int):
    """Flat histograms of every chunk of ``n`` consecutive rows (starting every n/CALIBRATION_STEP)."""
    if len(rows) <= n:
        yield binner.counts(rows)
        return
    idx = binner(rows)  # (m, F)
    onehot = np.zeros((len(rows) + 1, binner.total), dtype=np.int32)
    onehot[np.arange(1, len(rows) + 1)[:, None], idx] = 1  # a row's features never share a bin
    cum = onehot.cumsum(axis=0)
    for start in range(0, len(rows) - n + 1, max(1, n // CALIBRATION_STEP)):
        yield cum[start + n] - cum[start]


def _nearest(binner: _Binner, counts: np.ndarray, refs: np.ndarray, circular: set[int],
             smoothing: float) -> np.ndarray:
    return np.array([nearest_psi(counts[o:o + s], refs[:, o:o + s], j in circular, smoothing)
                     for j, (o, s) in enumerate(zip(binner.offsets, binner.sizes))])


# ---------------------------------------------------------------- on the device
@dataclass(frozen=True)
class Reference:
    """A card's ``drift`` object, parsed and checked once per model."""

    features: tuple[str, ...]
    binner: _Binner
    references: tuple[np.ndarray, ...]  # per feature (R, B_f); circular ones with every rotation
    thresholds: dict[str, float]
    samples: int
    smoothing: float
    method: str = METHOD

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "Reference | None":
        """The card's reference, or None when the card has no ``drift`` (older models: no
        drift monitoring).  :class:`DriftCardError` when it has one that cannot be used."""
        obj = card.get("drift")
        if obj is None:
            return None
        try:
            if obj.get("method") != METHOD:
                raise DriftCardError(f"drift method {obj.get('method')!r} is not {METHOD!r}")
            features = tuple(card["features"])
            circular = set(obj.get("circular", ()))
            edges, refs = [], []
            for f in features:
                e = np.asarray(obj["edges"][f], dtype=np.float64)
                r = np.asarray(obj["references"][f], dtype=np.float64)
                if e.ndim != 1 or np.any(np.diff(e) <= 0) or not np.isfinite(e).all():
                    raise DriftCardError(f"drift edges of {f} are not increasing finite numbers")
                if r.ndim != 2 or not len(r) or r.shape[1] != len(e) + 1 or not (r > 0).all():
                    raise DriftCardError(f"drift references of {f} are not positive proportions per bin")
                edges.append(e)
                refs.append(_rotations(r) if f in circular else r)
            thresholds = {f: float(obj["thresholds"][f]) for f in features}
            if not all(math.isfinite(t) and t > 0 for t in thresholds.values()):
                raise DriftCardError("drift thresholds must be positive")
            samples = int(obj["samples"])
            if samples < BLOCKS:
                raise DriftCardError(f"drift samples {samples} < {BLOCKS}")
            return cls(features, _Binner(edges), tuple(refs), thresholds, samples,
                       float(obj.get("smoothing", SMOOTHING)))
        except DriftCardError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DriftCardError(f"unusable drift object: {type(exc).__name__}: {exc}"[:200]) from None

    def scores(self, counts: np.ndarray) -> dict[str, float]:
        """Flat window counts -> nearest-reference PSI per feature."""
        b = self.binner
        return {f: float(psi(counts[o:o + s], r, self.smoothing).min())
                for f, o, s, r in zip(self.features, b.offsets, b.sizes, self.references)}


class DriftMonitor:
    """One turbine's sliding window of its last ``reference.samples`` readings, as a ring of
    :data:`BLOCKS` sub-histograms (the window holds more than ``n - n/BLOCKS`` and at most ``n`` readings).

    :meth:`update` per readings message (redelivered readings, by ``seq``, are not counted
    twice), :meth:`score` whenever a drift record is due.  Thread-safe."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.block = max(1, reference.samples // BLOCKS)
        self._ring = np.zeros((BLOCKS, reference.binner.total), dtype=np.int64)
        self._cur = 0  # the ring slot being filled
        self._filled = 0  # readings in that slot
        self.seen = 0  # readings counted since the monitor started
        self.next_seq: int | None = None
        self._lock = threading.Lock()

    @property
    def samples(self) -> int:
        """Readings in the window now."""
        return min(self.seen, (BLOCKS - 1) * self.block + self._filled)

    @property
    def ready(self) -> bool:
        """The window has been full once: a score describes ``n`` readings, not a start-up."""
        return self.seen >= self.reference.samples

    def update(self, rows: np.ndarray, seq: int | None = None) -> int:
        """Count ``rows`` ``(m, F)`` (raw features, model order) starting at ``seq``; returns how
        many were new."""
        with self._lock:
            if seq is not None:
                if self.next_seq is not None and seq < self.next_seq and \
                        seq + len(rows) > self.next_seq - RESTART_BACKSTEP:
                    rows = rows[self.next_seq - seq:]  # a redelivery: only what follows is new
                    seq = self.next_seq
                self.next_seq = seq + len(rows) if len(rows) else self.next_seq
            if not len(rows):
                return 0
            bins = self.reference.binner(rows)
            total = self.reference.binner.total
            done = 0
            while done < len(bins):  # one pass per ring slot the rows reach (usually one)
                if self._filled == self.block:  # the oldest slot makes room only when a reading needs it
                    self._cur = (self._cur + 1) % BLOCKS
                    self._ring[self._cur] = 0
                    self._filled = 0
                take = min(len(bins) - done, self.block - self._filled)
                self._ring[self._cur] += np.bincount(bins[done:done + take].ravel(), minlength=total)
                done += take
                self._filled += take
            self.seen += len(bins)
            return len(bins)

    def counts(self) -> np.ndarray:
        """The window's flat histogram (all features)."""
        with self._lock:
            return self._ring.sum(axis=0)

    def score(self) -> dict[str, float]:
        """Per feature, the window's PSI against the nearest training turbine."""
        return self.reference.scores(self.counts())

    def drifted(self, scores: Mapping[str, float] | None = None) -> list[str]:
        """The features whose score is above their threshold."""
        scores = self.score() if scores is None else scores
        return [f for f, v in scores.items() if v > self.reference.thresholds[f]]
