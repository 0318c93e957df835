"""The turbine simulator: determinism, ranges, labels."""

import numpy as np
import pytest

from windfleet.preprocessing import raw_features
from windfleet.simulation import KINDS, Anomaly, Turbine, random_schedule, simulate, turbine_seed


def test_same_seed_same_streams_other_seed_differs():
    a, b = simulate(turbines=2, seconds=60, seed=3), simulate(turbines=2, seconds=60, seed=3)
    c = simulate(turbines=2, seconds=60, seed=4)
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x["rps"], y["rps"]) and np.array_equal(x["qw"], y["qw"])
        assert not np.array_equal(x["rps"], z["rps"])
    assert not np.array_equal(a[0]["rps"], a[1]["rps"])  # turbines differ within a fleet
    assert turbine_seed(3, 0) == turbine_seed(3, 0) != turbine_seed(3, 1)


def test_streaming_in_small_steps_equals_one_big_step():
    schedule = [Anomaly("voltage_fault", 300, 200, 0.8), Anomaly("stuck_sensor", 700, 150, 0.7, "rps")]
    one = Turbine("t", 11, anomalies=schedule).step(1200)
    live = Turbine("t", 11, anomalies=schedule)
    parts = [live.step(n) for n in [1, 7, 92, 300, 800]]
    for key in ("rps", "voltage", "wind_speed_rps", "qw", "qz", "label"):
        assert np.array_equal(one[key], np.concatenate([p[key] for p in parts])), key


def test_normal_operation_matches_design_statistics():
    """DESIGN.md: mean [-0.008, 0.001, -0.107, 2.154, 1.611, 47.79], std [0.0164, 0.0163, 1.81, 0.391, 0.620, 26.38]."""
    x = np.concatenate([raw_features(d) for d in simulate(turbines=4, seconds=1800, seed=1, anomalies_per_hour=0)])
    mean, std = x.mean(axis=0), x.std(axis=0)
    assert abs(mean[0]) < 0.02 and abs(mean[1]) < 0.02  # roll, pitch near level
    assert 0.005 < std[0] < 0.04 and 0.005 < std[1] < 0.04
    assert 1.0 < std[2] < 2.5  # yaw wanders over the circle
    assert -np.pi <= x[:, 2].min() and x[:, 2].max() <= np.pi
    assert 1.5 < mean[3] < 3.0 and 0.2 < std[3] < 0.8  # anemometer pulses/s
    assert 1.1 < mean[4] < 2.2  # rotor pulses/s
    assert 30 < mean[5] < 70 and (x[:, 5] >= 0).all() and (x[:, 5] <= 1023).all()  # ADC counts


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_labelled_exactly_where_injected_and_changes_the_stream(kind):
    a = Anomaly(kind, 2000, 800, 0.9, "voltage" if kind == "stuck_sensor" else "")
    faulty = Turbine("t", 5, anomalies=[a]).step(3200)
    clean = Turbine("t", 5).step(3200)
    labels = faulty["label"]
    assert (labels[2000:2800] == kind).all()
    assert (labels[:2000] == "").all() and (labels[2800:] == "").all()
    assert np.array_equal(faulty["rps"][:2000], clean["rps"][:2000])  # nothing leaks before onset
    changed = max(np.abs(raw_features(faulty)[2000:2800] - raw_features(clean)[2000:2800]).max(axis=0)
                  / raw_features(clean).std(axis=0))
    assert changed > 0.5  # the fault moves at least one model feature by half a std


def test_random_schedule_is_non_overlapping_and_in_range():
    sched = random_schedule(np.random.default_rng(0), 20 * 3600 * 4, 20.0, per_hour=10)
    assert len(sched) > 10 and {a.kind for a in sched} <= set(KINDS)
    for a, b in zip(sched, sched[1:]):
        assert a.end <= b.start
    assert all(0.5 <= a.severity <= 1.0 for a in sched)
