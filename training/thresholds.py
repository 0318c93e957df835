"""Per-feature thresholds calibrated on held-out normal windows at a false-alarm rate.

A window alarms when ANY feature's error exceeds its threshold, so a per-feature
quantile at the target rate would alarm up to ``F`` times too often.  We calibrate
jointly: every feature gets the same tail probability ``p`` (its threshold is the
``1 - p`` quantile of that feature's held-out normal errors), and ``p`` is the
largest value for which the share of held-out normal windows with any exceedance
stays at or below the target.  Correlated features therefore get a larger share of
the budget than a Bonferroni split (``p = rate / F``) would give them.

Never the mean training error: that alarms on a large share of normal windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from windfleet.model_contract import DEFAULT_FALSE_ALARM_RATE


def alarms(errors: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``(k, F)`` errors -> ``(k,)`` bool: any feature above its threshold."""
    return (np.asarray(errors) > np.asarray(thresholds, dtype=np.float64)[None, :]).any(axis=1)


def scores(errors: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``(k,)`` anomaly score: the largest error / threshold ratio (> 1 alarms)."""
    return (np.asarray(errors) / np.asarray(thresholds, dtype=np.float64)[None, :]).max(axis=1)


def _at(errors: np.ndarray, p: float) -> np.ndarray:
    return np.quantile(errors, 1.0 - p, axis=0, method="higher")


def calibrate(errors: np.ndarray, rate: float = DEFAULT_FALSE_ALARM_RATE, iterations: int = 40) -> np.ndarray:
    """Thresholds ``(F,)`` such that at most ``rate`` of these normal windows alarm.

    ``errors``: ``(k, F)`` per-feature errors of held-out normal windows.  With
    fewer than ``1 / rate`` windows (a short recording) no quantile at ``rate``
    exists in the data: see :func:`extrapolate`.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or len(errors) == 0:
        raise ValueError("calibrate needs a (windows, features) array of held-out normal errors")
    if len(errors) * rate < 1:
        return extrapolate(errors, rate)
    lo, hi = 0.0, float(rate)  # p = 0 -> the maxima, which never alarm on these windows
    if alarms(errors, _at(errors, hi)).mean() <= rate:
        return _at(errors, hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if alarms(errors, _at(errors, mid)).mean() <= rate:
            lo = mid
        else:
            hi = mid
    return _at(errors, lo)


LEVEL_FLOOR = 1.0  # a predicted level's squared z-score that never alarms on its own


def floor_levels(thresholds: np.ndarray, predicted: Sequence[float], floor: float = LEVEL_FLOOR) -> np.ndarray:
    """Thresholds no lower than ``floor`` for features whose level the model predicts
    (``predicted[f]`` = 1; their error includes ``((level - mu) / sigma)^2``): a level
    within one predicted standard deviation of where the other sensors put it is
    normal by definition.  A feature the network predicts almost exactly on the
    calibration turbines (voltage from rotor speed) would otherwise get a threshold
    at a fraction of a sigma and alarm on the network's own approximation error on
    the next turbines (seed 9: 1.8 % false alarms, all on voltage, at z = -0.9)."""
    return np.maximum(np.asarray(thresholds, dtype=np.float64), floor * np.asarray(predicted, dtype=np.float64))


def extrapolate(errors: np.ndarray, rate: float = DEFAULT_FALSE_ALARM_RATE) -> np.ndarray:
    """Thresholds from too few windows to hold a ``rate`` quantile: each feature's
    errors fitted by a log-normal (reconstruction errors are positive and
    right-skewed), thresholds at its ``1 - rate / F`` quantile (Bonferroni over the
    features), and never below the largest error seen.  The largest of a few dozen
    errors alone is a ~5 % quantile: the next recording would alarm all the time."""
    from statistics import NormalDist

    errors = np.asarray(errors, dtype=np.float64)
    z = NormalDist().inv_cdf(1.0 - rate / errors.shape[1])
    log = np.log(np.maximum(errors, 1e-12))
    spread = log.std(axis=0, ddof=1) if len(errors) > 1 else np.zeros(errors.shape[1])
    return np.maximum(np.exp(log.mean(axis=0) + z * spread), errors.max(axis=0))

