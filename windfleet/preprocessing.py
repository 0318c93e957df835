"""The one preprocessing implementation shared by training, evaluation and the edge.

Pipeline for a window of ``WINDOW`` consecutive samples (rows) of raw features:

1. raw features: quaternion -> (roll, pitch, yaw), plus wind_speed_rps, rps, voltage
   (``model_contract.FEATURES`` order);
2. yaw is unwrapped inside the window and shifted by whole turns so the window's
   mean lies in [-pi, pi): a turbine facing due south must not look like a jump of
   2*pi when its yaw crosses the +/-pi seam;
3. z-score with the statistics stored in the model card;
4. wavelet denoising (PyWavelets, ``db4``, 2 levels, soft threshold): the detail
   thresholds are per feature, fixed at training time from the training data's
   noise level (``noise_sigma``) instead of re-estimated per window, so a fault's
   strong high-frequency content is kept rather than mistaken for noise;
5. reshape ``(features, WINDOW)`` -> ``(features, 10, 10)`` (another window size:
   ``(features, *model_contract.grid_shape(size))``, or the shape the card names).

Every step works on one window at a time (batched over windows), so a streaming
consumer that keeps the last ``WINDOW`` samples per turbine gets exactly the
numbers training got: :class:`StreamWindower` + :func:`prepare` are the edge path,
:func:`sliding_windows` + :func:`prepare` the offline path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pywt

from .model_contract import FEATURES, STRIDE, WINDOW, grid_shape

WAVELET = "db4"
LEVEL = 2
YAW = FEATURES.index("yaw")
MAX_GAP = 5  # NaN/inf runs up to this many samples are interpolated; longer runs are rejected


class DataError(ValueError):
    """Input that cannot be turned into model windows (one-line reason)."""


def euler_from_quaternion(qw, qx, qy, qz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit quaternion -> ZYX Euler angles (roll, pitch, yaw) in radians."""
    qw, qx, qy, qz = (np.asarray(a, dtype=np.float64) for a in (qw, qx, qy, qz))
    roll = np.arctan2(2 * (qw * qx + qy * qz), 1 - 2 * (qx * qx + qy * qy))
    pitch = np.arcsin(np.clip(2 * (qw * qy - qz * qx), -1.0, 1.0))
    yaw = np.arctan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
    return roll, pitch, yaw


def raw_features(samples: Mapping[str, Any] | Sequence[Mapping[str, float]]) -> np.ndarray:
    """Sensor samples -> ``(n, len(FEATURES))`` float64 in model order.

    Accepts either a mapping of equal-length arrays (the simulator, a CSV) or a
    list of sample dicts (a readings payload).
    """
    if not isinstance(samples, Mapping):
        keys = ("qw", "qx", "qy", "qz", "wind_speed_rps", "rps", "voltage")
        cols = np.array([[s[k] for k in keys] for s in samples], dtype=np.float64).reshape(-1, len(keys))
        samples = dict(zip(keys, cols.T))
    roll, pitch, yaw = euler_from_quaternion(samples["qw"], samples["qx"], samples["qy"], samples["qz"])
    columns = {"roll": roll, "pitch": pitch, "yaw": yaw}
    out = np.empty((len(roll), len(FEATURES)))
    for j, name in enumerate(FEATURES):
        out[:, j] = columns[name] if name in columns else np.asarray(samples[name], dtype=np.float64)
    return out


def sliding_windows(x: np.ndarray, window: int = WINDOW, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """``(n, F)`` -> windows ``(k, window, F)`` and each window's last row index ``(k,)``.

    Windows end at rows ``window-1, window-1+stride, ...`` -- the rows at which a
    streaming consumer that started at row 0 emits them.
    """
    n = len(x)
    if n < window:
        return np.empty((0, window, x.shape[1])), np.empty(0, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)[::stride]  # (k, F, window)
    ends = np.arange(window - 1, n, stride)[: len(view)]
    return np.ascontiguousarray(view.transpose(0, 2, 1)), ends


def _circular(stats: Mapping[str, Any] | None) -> tuple[int, ...]:
    """Indices of angle features to unwrap: ``stats["circular"]`` when the statistics
    say so (a CSV model without yaw stores ``[]``), else yaw of ``FEATURES``."""
    if stats is not None and "circular" in stats:
        return tuple(int(i) for i in stats["circular"])
    return (YAW,)


def _unwrap_yaw(w: np.ndarray, circular: Sequence[int] = (YAW,)) -> np.ndarray:
    if not len(circular) or len(w) == 0:
        return w
    w = w.copy()
    for j in circular:
        yaw = np.unwrap(w[:, :, j], axis=1)
        turns = np.floor((yaw.mean(axis=1, keepdims=True) + math.pi) / (2 * math.pi))
        w[:, :, j] = yaw - 2 * math.pi * turns
    return w


def standardize(w: np.ndarray, stats: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Windows ``(k, window, F)`` raw -> z-scored ``(k, F, window)`` (yaw unwrapped first)."""
    w = _unwrap_yaw(w, _circular(stats))
    z = (w - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    return z.transpose(0, 2, 1)


def denoise(z: np.ndarray, noise_sigma: Sequence[float]) -> np.ndarray:
    """Soft-threshold the detail coefficients of ``(k, F, window)`` z-scored windows.

    Threshold per feature: the universal threshold sigma * sqrt(2 ln window).
    """
    coeffs = pywt.wavedec(z, WAVELET, level=wavelet_level(z.shape[-1]), axis=-1, mode="periodization")
    lam = (np.asarray(noise_sigma) * math.sqrt(2 * math.log(z.shape[-1])))[None, :, None]
    for i in range(1, len(coeffs)):
        c = coeffs[i]
        coeffs[i] = np.sign(c) * np.maximum(np.abs(c) - lam, 0.0)
    return pywt.waverec(coeffs, WAVELET, axis=-1, mode="periodization")[..., : z.shape[-1]]


def wavelet_level(window: int) -> int:
    """``LEVEL``, or fewer for short windows (a CSV model's), where deeper levels
    would be all boundary effect."""
    return max(1, min(LEVEL, pywt.dwt_max_level(window, WAVELET)))


def estimate_noise_sigma(raw_windows: np.ndarray, stats: Mapping[str, Sequence[float]]) -> list[float]:
    """Per-feature noise level in z units: median over windows of MAD/0.6745 of the finest details."""
    z = standardize(raw_windows, stats)
    detail = pywt.wavedec(z, WAVELET, level=1, axis=-1, mode="periodization")[1]
    mad = np.median(np.abs(detail - np.median(detail, axis=-1, keepdims=True)), axis=-1) / 0.6745
    return [float(v) for v in np.median(mad, axis=0)]


def fit_statistics(raw: np.ndarray, circular: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Mean/std per feature over normal training rows (yaw as unwrapped in windows).

    ``circular``: indices of angle columns to unwrap per window (default: yaw of
    ``FEATURES`` when ``raw`` has those columns, none otherwise).
    """
    windows, _ = sliding_windows(raw, WINDOW, WINDOW)
    if len(windows):
        return fit_statistics_windows(windows, circular)
    circ = _default_circular(raw.shape[1], circular)
    std = raw.std(axis=0)
    stats = {"mean": raw.mean(axis=0).tolist(), "std": np.where(std > 1e-9, std, 1.0).tolist()}
    stats["noise_sigma"] = [0.0] * raw.shape[1]
    if circular is not None:
        stats["circular"] = list(circ)
    return stats


def _default_circular(n_features: int, circular: Sequence[int] | None) -> tuple[int, ...]:
    if circular is not None:
        return tuple(int(i) for i in circular)
    return (YAW,) if n_features == len(FEATURES) else ()


def fit_statistics_windows(raw_windows: np.ndarray, circular: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Like :func:`fit_statistics` from raw windows ``(k, WINDOW, F)`` already cut
    (e.g. the normal windows of many turbines, which must not be glued together).
    The windows may overlap; overlap only reweights the rows."""
    circ = _default_circular(raw_windows.shape[2], circular)
    flat = _unwrap_yaw(raw_windows, circ).reshape(-1, raw_windows.shape[2])
    std = flat.std(axis=0)
    stats: dict[str, list] = {"mean": flat.mean(axis=0).tolist(), "std": np.where(std > 1e-9, std, 1.0).tolist()}
    if circular is not None or circ != (YAW,):
        stats["circular"] = list(circ)
    stats["noise_sigma"] = estimate_noise_sigma(raw_windows, stats)
    return stats


def prepare(raw_windows: np.ndarray, stats: Mapping[str, Sequence[float]],
            shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Raw windows ``(k, W, F)`` -> model input ``(k, F, *shape)`` float32.

    ``shape``: the model's input dims after the feature axis (``card["window"]["shape"][1:]``);
    ``None`` -> :func:`model_contract.grid_shape` of ``W`` (``(10, 10)`` for 100).
    Values too large to standardise come out as inf/NaN, never as an exception: the
    scorer counts such a window as anomalous (``windows_non_finite``).
    """
    raw_windows = np.asarray(raw_windows, dtype=np.float64)
    shape = tuple(shape) if shape is not None else grid_shape(raw_windows.shape[1])
    if math.prod(shape) != raw_windows.shape[1]:
        raise DataError(f"windows of {raw_windows.shape[1]} samples do not fit the model's shape {shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        z = denoise(standardize(raw_windows, stats), stats["noise_sigma"])
        return z.reshape(len(z), z.shape[1], *shape).astype(np.float32)


def clean_gaps(x: np.ndarray, max_gap: int = MAX_GAP) -> np.ndarray:
    """Interpolate runs of NaN/inf up to ``max_gap`` rows; DataError for longer runs.

    Policy: short dropouts (a few samples at 20 Hz) are sensor glitches worth
    bridging; a longer outage is missing data, and inventing it would train or
    score the model on fiction.
    """
    x = np.array(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if not bad.any():
        return x
    for j in range(x.shape[1]):
        col, b = x[:, j], bad[:, j]
        if not b.any():
            continue
        if b.all():
            raise DataError(f"column {j} has no finite values")
        run, longest, start = 0, 0, 0
        for i, v in enumerate(b):
            run = run + 1 if v else 0
            if run > longest:
                longest, start = run, i - run + 1
        if longest > max_gap:
            raise DataError(f"{longest} consecutive non-finite values in feature {j} from row {start} (at most {max_gap} are interpolated)")
        idx = np.arange(len(col))
        col[b] = np.interp(idx[b], idx[~b], col[~b])
    return x


class StreamWindower:
    """Per-turbine streaming windows: feed consecutive rows, get a window every ``stride`` rows.

    A contiguous stream emits the windows :func:`sliding_windows` cuts from the same
    rows.  Redelivered rows (``seq`` already seen, e.g. a QoS1 duplicate) are dropped;
    a gap in ``seq`` (lost readings) restarts the window so no window spans missing
    data.  ``state()``/``from_state()`` let the detector keep its tail across a restart,
    :meth:`resized` across a model whose window differs.

    Vectorised: a batch of rows costs one concatenate and some index arithmetic, and
    :meth:`push_block` hands back the rows spanning all the windows it completes (no
    per-row or per-window Python).
    """

    def __init__(self, window: int = WINDOW, stride: int = STRIDE, n_features: int = len(FEATURES)):
        if window < 1 or stride < 1:
            raise ValueError(f"window {window} and stride {stride} must be positive")
        self.window, self.stride = window, stride
        self.buf = np.empty((0, n_features))  # the last min(count, window - 1) rows
        self.next_seq: int | None = None
        self.count = 0  # contiguous rows seen since the last (re)start

    def push_block(self, seq: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Append rows starting at ``seq``; return ``(end_seqs (k,), block)`` for the k >= 1
        windows they complete (window ``j`` is ``block[j * stride : j * stride + window]``),
        or None when they complete none."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.buf.shape[1])
        if self.next_seq is not None and seq < self.next_seq:
            skip = self.next_seq - seq
            if skip >= len(rows):
                return None
            rows, seq = rows[skip:], self.next_seq
        if self.next_seq is not None and seq != self.next_seq:
            self.buf, self.count = self.buf[:0], 0
        self.next_seq = seq + len(rows)
        before, held = self.count, len(self.buf)
        self.count += len(rows)
        buf = np.concatenate([self.buf, rows]) if held else rows
        self.buf = buf[len(buf) - min(len(buf), self.window - 1):].copy()
        # A window ends at the row whose count c (1-based since the restart) has c >= window
        # and (c - window) % stride == 0; the first such c after ``before``:
        first = self.window + -(-max(0, before + 1 - self.window) // self.stride) * self.stride
        if first > self.count:
            return None
        k = (self.count - first) // self.stride + 1
        offset = before - held  # buf[i] holds count offset + i + 1
        block = buf[first - self.window - offset: first + (k - 1) * self.stride - offset]
        ends = seq + (first - before - 1) + self.stride * np.arange(k, dtype=np.int64)
        return ends, block

    def push(self, seq: int, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Like :meth:`push_block`, one ``(window_end_seq, window (window, F))`` per window."""
        out = self.push_block(seq, rows)
        if out is None:
            return []
        ends, block = out
        windows = np.lib.stride_tricks.sliding_window_view(block, self.window, axis=0)[:: self.stride]
        return [(int(e), w.T) for e, w in zip(ends, windows)]

    def resized(self, window: int, stride: int) -> "StreamWindower":
        """A windower for another window/stride that carries this one's tail: the stream
        goes on without a gap; when the new window is longer than the tail, its first
        window waits for the rows it lacks."""
        w = type(self)(window, stride, self.buf.shape[1])
        w.buf = self.buf[len(self.buf) - min(len(self.buf), window - 1):].copy()
        w.next_seq = self.next_seq
        w.count = self.count if len(w.buf) >= min(self.count, window - 1) else len(w.buf)
        return w

    def state(self) -> dict:
        return {"buf": self.buf.tolist(), "next_seq": self.next_seq, "count": self.count,
                "window": self.window, "stride": self.stride}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], window: int = WINDOW, stride: int = STRIDE) -> "StreamWindower":
        saved = cls(int(state.get("window", WINDOW)), int(state.get("stride", STRIDE)))
        saved.buf = np.asarray(state["buf"], dtype=np.float64).reshape(-1, len(FEATURES))
        saved.next_seq, saved.count = state["next_seq"], int(state["count"])
        return saved if (saved.window, saved.stride) == (window, stride) else saved.resized(window, stride)
