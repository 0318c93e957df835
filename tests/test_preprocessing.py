"""The shared preprocessing: streaming == offline, gaps, duplicates, quaternions."""

import math

import numpy as np
import pytest

from windfleet.model_contract import FEATURES, STRIDE, WINDOW
from windfleet.preprocessing import (DataError, StreamWindower, clean_gaps, euler_from_quaternion, fit_statistics,
                                     prepare, raw_features, sliding_windows)
from windfleet.simulation import _quaternion, simulate


@pytest.fixture(scope="module")
def stream():
    data = simulate(turbines=1, seconds=60, seed=2)[0]
    raw = raw_features(data)
    return raw, fit_statistics(raw)


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    roll, pitch = rng.uniform(-1.2, 1.2, 500), rng.uniform(-1.2, 1.2, 500)
    yaw = rng.uniform(-math.pi, math.pi, 500)
    q = _quaternion(roll, pitch, yaw)
    assert np.allclose(q["qw"] ** 2 + q["qx"] ** 2 + q["qy"] ** 2 + q["qz"] ** 2, 1.0)
    r, p, y = euler_from_quaternion(q["qw"], q["qx"], q["qy"], q["qz"])
    assert np.allclose(r, roll, atol=1e-9) and np.allclose(p, pitch, atol=1e-9)
    assert np.allclose(np.remainder(y - yaw + math.pi, 2 * math.pi) - math.pi, 0, atol=1e-9)


def test_streaming_windows_equal_offline_windows_bit_for_bit(stream):
    raw, stats = stream
    offline, ends = sliding_windows(raw)
    w = StreamWindower()
    got, seq = [], 0
    for size in [1, 3, 50, 7, 200] * 40:  # readings arrive in uneven batches
        if seq >= len(raw):
            break
        got += w.push(seq, raw[seq : seq + size])
        seq += size
    assert [s for s, _ in got] == list(ends)
    online = np.stack([win for _, win in got])
    assert np.array_equal(online, offline)
    assert np.array_equal(prepare(online, stats), prepare(offline, stats))


def test_duplicates_are_dropped_and_gaps_restart_the_window(stream):
    raw, _ = stream
    w = StreamWindower()
    out = w.push(0, raw[:150])
    assert w.push(100, raw[100:150]) == []  # a QoS1 redelivery adds nothing
    out += w.push(140, raw[140:160])  # overlapping batch: only rows 150..159 are new
    assert [s for s, _ in out] == [99, 109, 119, 129, 139, 149, 159]
    assert np.array_equal(out[-1][1], raw[60:160])
    after_gap = w.push(200, raw[200:400])  # rows 160..199 were lost
    assert after_gap[0][0] == 299 and np.array_equal(after_gap[0][1], raw[200:300])
    assert [s for s, _ in after_gap] == list(range(299, 400, STRIDE))


def test_state_round_trip_keeps_the_tail(stream):
    raw, _ = stream
    a = StreamWindower()
    a.push(0, raw[:137])
    b = StreamWindower.from_state(a.state())
    assert [s for s, _ in a.push(137, raw[137:260])] == [s for s, _ in b.push(137, raw[137:260])]


def test_yaw_crossing_the_seam_is_not_a_jump():
    t = np.arange(WINDOW)
    raw = np.zeros((WINDOW, len(FEATURES)))
    raw[:, 2] = np.remainder(math.pi - 0.05 + 0.001 * t + math.pi, 2 * math.pi) - math.pi  # crosses +pi
    raw[:, 3:] = 1.0
    stats = {"mean": [0.0] * 6, "std": [1.0] * 6, "noise_sigma": [0.0] * 6}
    z = prepare(raw[None], stats)[0, 2].ravel()
    assert np.ptp(z) < 0.2


def test_short_gaps_interpolated_long_gaps_rejected():
    x = np.arange(40.0).reshape(20, 2)
    x[5:8, 0] = np.nan
    x[10, 1] = np.inf
    y = clean_gaps(x)
    assert np.isfinite(y).all() and np.allclose(y[5:8, 0], [10, 12, 14]) and y[10, 1] == 21
    x[2:12, 1] = np.nan
    with pytest.raises(DataError, match="10 consecutive"):
        clean_gaps(x)


def test_prepare_takes_the_models_window_shape(stream):
    from windfleet.model_contract import grid_shape

    x, stats = stream
    w100, _ = sliding_windows(x, WINDOW, STRIDE)
    assert prepare(w100, stats).shape == (len(w100), len(FEATURES), 10, 10)  # the old default
    assert np.array_equal(prepare(w100, stats), prepare(w100, stats, (10, 10)))
    w20, _ = sliding_windows(x, 20, 2)
    assert grid_shape(20) == (4, 5) and prepare(w20, stats).shape == (len(w20), len(FEATURES), 4, 5)
    assert prepare(w20, stats, (20,)).shape == (len(w20), len(FEATURES), 20)  # a 1-D model
    with pytest.raises(DataError, match="do not fit"):
        prepare(w20, stats, (10, 10))
