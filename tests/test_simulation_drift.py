"""Drift scenarios in the simulator: a sensor offset ramps in exactly, a wind regime change
moves the site's mean wind, nothing else changes (other turbines, labels, the stream before
the start), and the component's ``drift`` configuration is checked with one-line reasons."""

from __future__ import annotations

import numpy as np
import pytest

from windfleet import payloads, topics
from windfleet.components.simulator import run
from windfleet.components.simulator.service import ConfigError, drift_schedule
from windfleet.simulation import ANEMO_PER_MS, RATED, RPS_PER_MS, Anomaly, Drift, Turbine, simulate

from tests.detector_fixtures import FakeBus


def ramp(n: int, start: int, length: int) -> np.ndarray:
    return np.clip((np.arange(n) - start) / length, 0.0, 1.0)


def test_a_sensor_offset_ramps_in_linearly_then_holds_exactly():
    clean = Turbine("t", 7).step(3000)
    drifted = Turbine("t", 7, drift=[Drift("sensor_offset", 1000, 400, "voltage", 60.0)]).step(3000)
    np.testing.assert_allclose(drifted["voltage"] - clean["voltage"], 60.0 * ramp(3000, 1000, 400), atol=1e-9)
    for key in ("rps", "wind_speed_rps", "qw", "qz", "temperature"):  # only the drifted sensor reads differently
        assert np.array_equal(drifted[key], clean[key]), key
    # an IMU offset reaches the quaternion the detector reads
    tilted = Turbine("t", 7, drift=[Drift("sensor_offset", 0, 0, "roll", 0.05)]).step(500)
    np.testing.assert_allclose(tilted["roll"] - clean["roll"][:500], 0.05, atol=1e-12)
    assert not np.array_equal(tilted["qx"], clean["qx"][:500])


def test_a_wind_regime_change_moves_the_site_mean_and_the_rotor_follows_the_power_curve():
    drift = [Drift("wind_regime", 2000, 400, mean_wind=16.0)]
    clean, windy = Turbine("t", 3).step(12000), Turbine("t", 3, drift=drift).step(12000)
    assert np.array_equal(windy["wind_speed_rps"][:2000], clean["wind_speed_rps"][:2000])
    before, after = clean["wind_speed_rps"][2400:].mean(), windy["wind_speed_rps"][2400:].mean()
    # the site's mean moves by 16 - 8 m/s at once, not at the slow weather's 15-minute pace
    assert after - before == pytest.approx(ANEMO_PER_MS * 8.0, rel=0.1)
    assert windy["rps"][3000:].mean() > 0.9 * RPS_PER_MS * RATED > clean["rps"][3000:].mean()
    assert windy["pitch_angle"][3000:].mean() > 5 > clean["pitch_angle"][3000:].mean()  # pitched to shed power
    # a second regime moves it on from the first's
    calm = Turbine("t", 3, drift=drift + [Drift("wind_regime", 6000, 0, mean_wind=8.0)]).step(12000)
    assert calm["wind_speed_rps"][7000:].mean() == pytest.approx(clean["wind_speed_rps"][7000:].mean(), rel=0.05)


def test_drift_leaves_labels_other_turbines_and_streaming_unchanged():
    drift = {1: [Drift("sensor_offset", 600, 200, "wind_speed_rps", 0.8), Drift("wind_regime", 900, 100, mean_wind=15.0)]}
    plain = simulate(turbines=2, seconds=180, seed=4, anomalies_per_hour=240)
    drifted = simulate(turbines=2, seconds=180, seed=4, anomalies_per_hour=240, drift=drift)
    for key in ("rps", "voltage", "qw", "label"):
        assert np.array_equal(plain[0][key], drifted[0][key]), key  # the undrifted turbine
        assert np.array_equal(plain[1][key][:600], drifted[1][key][:600]), key
    assert (plain[1]["label"] != "").any() and np.array_equal(plain[1]["label"], drifted[1]["label"])  # no fault
    one = Turbine("t", 11, anomalies=[Anomaly("stuck_sensor", 700, 150, 0.7, "voltage")],
                  drift=[Drift("sensor_offset", 300, 500, "voltage", 40.0)])
    live = Turbine("t", 11, anomalies=one.anomalies, drift=one.drift)
    whole, parts = one.step(1200), [live.step(n) for n in (1, 299, 7, 93, 800)]
    for key in ("voltage", "wind_speed_rps", "label"):
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in parts])), key
    assert len(set(whole["voltage"][700:850])) == 1  # a stuck sensor stays stuck under an offset


def collect(**config) -> FakeBus:
    bus = FakeBus("gw1", config={"realtime": False, "start_ts": 1_700_000_000.0, "turbines": 3, "duration_s": 20,
                                 "seed": 2, **config})
    assert run(bus) == 0
    return bus


def column(bus: FakeBus, tid: str, name: str) -> np.ndarray:
    return np.array([s[name] for t, b in bus.published if t == topics.readings(tid)
                     for s in payloads.readings_samples(b)])


def test_the_simulator_component_drifts_the_chosen_turbines_without_labels():
    drift = [{"kind": "sensor_offset", "turbines": [0, "gw1-t02"], "channel": "voltage", "offset": 60,
              "start_s": 5, "ramp_s": 5},
             {"kind": "wind_regime", "turbines": [1], "mean_wind": 16, "start_s": 5, "ramp_s": 2}]
    anomalies = [{"turbine": 0, "kind": "rotor_imbalance", "start_s": 12, "duration_s": 3}]
    plain, drifted = collect(anomalies=anomalies), collect(anomalies=anomalies, drift=drift)
    for tid in ("gw1-t00", "gw1-t02"):
        np.testing.assert_allclose(column(drifted, tid, "voltage") - column(plain, tid, "voltage"),
                                   60.0 * ramp(400, 100, 100), atol=1e-9)
    assert np.array_equal(column(drifted, "gw1-t01", "voltage")[:100], column(plain, "gw1-t01", "voltage")[:100])
    assert column(drifted, "gw1-t01", "wind_speed_rps")[200:].mean() > column(plain, "gw1-t01", "wind_speed_rps")[200:].mean() + 1.0
    labels = lambda bus: [b for t, b in bus.published if t.endswith("/labels")]  # noqa: E731
    assert labels(drifted) == labels(plain) and len(labels(plain)) == 1
    health = [b for t, b in drifted.published if t == topics.health("gw1")][-1]
    assert set(health["drift"]) == {"gw1-t00", "gw1-t01", "gw1-t02"}
    assert health["drift"]["gw1-t00"] == [{"kind": "sensor_offset", "progress": 1.0, "channel": "voltage",
                                           "offset": 60.0, "target_offset": 60.0}]
    assert health["drift"]["gw1-t01"] == [{"kind": "wind_regime", "progress": 1.0, "mean_wind": 16.0}]
    assert [b for t, b in plain.published if t == topics.health("gw1")][-1]["drift"] == {}


def test_one_fleet_wide_configuration_names_turbines_of_any_gateway():
    """The same configuration reaches every gateway of a thing group: ids of other gateways'
    turbines are skipped, ids on this gateway apply, an id this gateway lacks is an error."""
    entry = {"kind": "sensor_offset", "turbines": ["gw2-t01", "gw1-t00"], "channel": "voltage", "offset": 60,
             "start_s": 1}
    here = drift_schedule([entry], ["gw1-t00", "gw1-t01"], 20.0)
    assert [d.kind for d in here["gw1-t00"]] == ["sensor_offset"] and here["gw1-t01"] == []
    assert drift_schedule([entry], ["gw3-t00", "gw3-t01"], 20.0) == {"gw3-t00": [], "gw3-t01": []}
    with pytest.raises(ConfigError, match="unknown turbine 'gw1-t07'"):
        drift_schedule([{**entry, "turbines": ["gw1-t07"]}], ["gw1-t00", "gw1-t01"], 20.0)


@pytest.mark.parametrize("entry, reason", [
    ({"kind": "heatwave", "turbines": [0], "start_s": 1}, "kind 'heatwave' is not one of"),
    ({"kind": "sensor_offset", "turbines": [5], "channel": "voltage", "offset": 1, "start_s": 1}, "unknown turbine 5"),
    ({"kind": "sensor_offset", "turbines": [], "channel": "voltage", "offset": 1, "start_s": 1}, "turbines must be"),
    ({"kind": "sensor_offset", "turbines": [0], "channel": "torque", "offset": 1, "start_s": 1}, "channel 'torque'"),
    ({"kind": "sensor_offset", "turbines": [0], "channel": "voltage", "start_s": 1}, "offset is required"),
    ({"kind": "sensor_offset", "turbines": [0], "channel": "voltage", "offset": "lots", "start_s": 1}, "offset must be"),
    ({"kind": "wind_regime", "turbines": [0], "mean_wind": 80, "start_s": 1}, "mean_wind must be in 0..30"),
    ({"kind": "wind_regime", "turbines": [0], "mean_wind": 12, "start_s": -1}, "start_s and ramp_s must be >= 0"),
    ({"kind": "wind_regime", "turbines": [0], "mean_wind": 12, "start_s": 1, "offset": 3}, "unknown key(s)"),
    ("voltage +60", "each entry must be an object"),
])
def test_bad_drift_configuration_is_a_one_line_config_error(entry, reason):
    ok = {"kind": "wind_regime", "turbines": [1], "mean_wind": 14, "start_s": 2}
    with pytest.raises(ConfigError, match=r"^drift\[1\]: ") as err:
        drift_schedule([ok, entry], ["gw1-t00", "gw1-t01"], 20.0)
    assert reason in str(err.value) and "\n" not in str(err.value)
    bus = FakeBus(config={"realtime": False, "duration_s": 1, "turbines": 2, "drift": [ok, entry]})
    assert run(bus) == 2
    assert bus.states[-1][0] == "ERRORED" and str(err.value) == bus.states[-1][1]["reason"]
    assert not [t for t, _ in bus.published if "/readings" in t]
