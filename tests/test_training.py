"""Training pipeline pieces: thresholds, export parity, the model card, `windfleet train`."""

import numpy as np
import pytest

from windfleet import model_contract as mc
from windfleet.training import export as ex
from windfleet.training import thresholds as th
from windfleet.training.data import EXCLUDED, window_labels
from windfleet.training.model import ConvAutoencoder


def test_window_labels_rule():
    labels = np.array([""] * 300, dtype=object)
    labels[100:160] = "overspeed"  # window 0..99 clean; 60..159 has 60 %; 100..199 has 60 %
    labels[250:280] = "voltage_fault"  # 30 % of 200..299 -> excluded
    got = window_labels(labels, np.array([99, 159, 199, 299]))
    assert list(got) == ["", "overspeed", "overspeed", EXCLUDED]


@pytest.mark.parametrize("rate", [0.001, 0.01])
def test_thresholds_hit_their_false_alarm_rate_on_held_out_normal_data(rate):
    rng = np.random.default_rng(1)
    cov = np.full((6, 6), 0.5) + 0.5 * np.eye(6)  # correlated features, like real errors
    def normal(n):
        return np.exp(rng.multivariate_normal(np.zeros(6), cov, n))
    t = th.calibrate(normal(40_000), rate)
    held_out = th.alarms(normal(200_000), t).mean()
    assert 0.6 * rate < held_out < 1.4 * rate
    # the naive per-feature quantile would alarm far more often; mean error far more still
    naive = np.quantile(normal(40_000), 1 - rate, axis=0)
    assert th.alarms(normal(200_000), naive).mean() > 2 * rate
    assert th.alarms(normal(10_000), normal(40_000).mean(axis=0)).mean() > 0.3


def test_thresholds_from_too_few_windows_extrapolate_beyond_the_maxima():
    rng = np.random.default_rng(0)
    def normal(n):
        return np.exp(rng.standard_normal((n, 3)))
    e = normal(50)  # a short recording: no 0.1 % quantile in 50 windows
    t = th.calibrate(e, 0.001)
    assert (t >= e.max(axis=0)).all() and not th.alarms(e, t).any()
    assert th.alarms(normal(100_000), t).mean() < 0.01  # the max of 50 alone: ~6 % (3 features x 1/50)


def test_a_predicted_level_within_one_sigma_never_alarms():
    # calibration errors of a feature the level network predicts almost exactly (voltage from
    # rotor speed) give a threshold at a fraction of a sigma; the floor lifts it to one sigma^2,
    # and leaves alone features whose level is kept (free) and thresholds already above it
    t = th.floor_levels(np.array([0.05, 0.4, 7.0]), predicted=[0.0, 1.0, 1.0])
    assert list(t) == [0.05, 1.0, 7.0]
    assert not th.alarms(np.array([[0.01, 0.86, 6.0]]), t).any()  # z = -0.93 on the predicted level


def test_export_parity_and_dynamic_batch(tmp_path):
    model = ConvAutoencoder()
    x = mc.self_test_input()
    err = ex.export_onnx(model, tmp_path / "m.onnx", x)
    assert err <= 1e-4
    for batch in (1, 3, 300):  # one graph for any batch size
        y = np.random.default_rng(batch).standard_normal((batch, 6, 10, 10)).astype(np.float32)
        assert ex.onnx_outputs(tmp_path / "m.onnx", y).shape == y.shape
    assert not (tmp_path / "m.onnx.data").exists()  # weights inside: one self-contained file


def test_broken_parity_fails_the_export_and_leaves_no_file(tmp_path, monkeypatch):
    real = ex.onnx_outputs
    monkeypatch.setattr(ex, "onnx_outputs", lambda path, x: real(path, x) + 1e-3)
    with pytest.raises(ex.ExportError, match="parity"):
        ex.export_onnx(ConvAutoencoder(), tmp_path / "m.onnx", mc.self_test_input())
    assert not (tmp_path / "m.onnx").exists()


def test_model_card_has_every_key_and_a_true_self_test(model_dir):
    card = mc.load_card(model_dir)
    assert set(mc.CARD_KEYS) <= set(card)
    assert card["version"] == "1.0.0" and card["features"] == list(mc.FEATURES)
    assert set(card["thresholds"]) == set(mc.FEATURES) and all(v > 0 for v in card["thresholds"].values())
    assert card["window"] == {"size": 100, "stride": 10, "shape": [6, 10, 10]}
    assert card["opset"] >= 17 and card["input_name"] == mc.INPUT_NAME and len(card["data_fingerprint"]) == 64
    for key in ("mean", "std", "noise_sigma"):
        assert len(card["statistics"][key]) == 6
    x = mc.self_test_input()
    errors = mc.window_errors(x, ex.onnx_outputs(model_dir / mc.MODEL_FILE, x))
    assert np.allclose(errors, card["self_test"]["feature_errors"], rtol=1e-5)


def test_model_dir_factory_versions(model_dir_factory):
    other = model_dir_factory("1.1.0")
    assert mc.load_card(other)["version"] == "1.1.0"
    assert mc.load_card(model_dir_factory("1.0.0"))["version"] == "1.0.0"


def test_yaw_misalignment_is_labelled_where_the_nacelle_is_misaligned():
    from windfleet.simulation import Anomaly, Turbine
    from windfleet.training.data import IDLE_WIND_RPS, YAW_MISALIGNED, physical_labels

    data = Turbine("t", 5, anomalies=[Anomaly("yaw_misalignment", 2000, 800, 0.9)]).step(3600)
    labels, off = physical_labels(data), np.abs(data["misalignment"]) > YAW_MISALIGNED
    turning = data["wind_speed_rps"] >= IDLE_WIND_RPS  # below cut-in: excluded (the next test)
    assert (labels[2000:2060] == EXCLUDED).all()  # turning away: still inside the deadband
    assert (labels[off & turning] == "yaw_misalignment").all()
    assert (off & turning)[2800:].any()  # still off the wind after the fault
    assert (labels[:2000] == "").all() and set(labels) == {"", EXCLUDED, "yaw_misalignment"}


def test_faults_acting_through_the_rotor_are_excluded_while_it_idles_not_missed():
    """Below cut-in a misaligned nacelle costs no power and an imbalanced rotor barely turns:
    no feature can show them, so those samples are neither anomalies to catch nor normal."""
    from windfleet.simulation import Anomaly, Turbine
    from windfleet.training.data import IDLE_WIND_RPS, YAW_MISALIGNED, physical_labels

    faults = [Anomaly("yaw_misalignment", 2000, 800, 0.9), Anomaly("rotor_imbalance", 4000, 400, 0.9),
              Anomaly("overspeed", 5000, 200, 0.9)]
    calm = Turbine("t", 5, anomalies=faults, mean_wind=-5.0).step(6000)
    labels = physical_labels(calm)
    assert (calm["wind_speed_rps"] < IDLE_WIND_RPS).all() and (np.abs(calm["misalignment"]) > YAW_MISALIGNED).any()
    assert (labels[2000:2800] == EXCLUDED).all() and (labels[4000:4400] == EXCLUDED).all()
    assert (labels[5000:5200] == "overspeed").all()  # it spins the rotor up: plain to see
    assert (calm["rps"][5100:5200] > 1).all()
    windy = Turbine("t", 5, anomalies=faults[1:2], mean_wind=9.0).step(6000)
    assert (physical_labels(windy)[4000:4400] == "rotor_imbalance").all()


def test_regime_calibration_evens_out_the_level_score_across_operating_regimes(tmp_path):
    """A level's score is heavier-tailed in some regimes (an idling rotor spinning down from a
    gust) than in others (partial load): after calibrate_regimes no regime's 99th percentile
    is above the median regime's, regimes at or below it score exactly as before, and the
    calibrated model still exports with torch/onnxruntime parity."""
    import torch

    from windfleet.training import pipeline as P
    from windfleet.training import train as tr
    from windfleet.training.model import REGIME_BINS, REGIME_QUANTILE

    ds = P.simulated_dataset(1, 3, 0.25, test=False)
    stats = P.fit_statistics_windows(ds.train.raw, ds.circular)
    x_train, x_val, x_cal = (P.prepare(w.raw, stats, mc.grid_shape(ds.window)) for w in (ds.train, ds.val, ds.calib))
    model, _ = tr.fit(x_train, x_val, seed=1, epochs=2, progress=False, free=[2], check=x_cal)
    before = tr.reconstruct(model, x_cal)
    fit = tr.calibrate_regimes(model, x_cal)
    assert fit and all(min(r["scale"]) >= 1.0 for r in fit.values())
    with torch.no_grad():
        level, _, mu, log_sigma = model._paths(torch.from_numpy(x_cal))
        z2 = (((level.flatten(1) - mu) * torch.exp(-log_sigma)) / model.regime_scale(mu)) ** 2
    for f, r in fit.items():
        f = int(f)
        which = np.searchsorted(np.array(r["edges"]), mu[:, f].numpy(), side="left")
        q = [np.quantile(z2[which == b, f].numpy(), REGIME_QUANTILE) for b in range(REGIME_BINS)]
        assert max(q) <= np.median(q) * 1.01 + 1e-9, (f, q)
    after = tr.reconstruct(model, x_cal)
    unscaled = (model.regime_scale(mu) == 1.0).all(dim=1).numpy()
    assert unscaled.any() and (~unscaled).any()
    assert np.allclose(after[unscaled], before[unscaled])
    assert ex.export_onnx(model, tmp_path / "m.onnx", x_cal[:256]) <= ex.PARITY_ATOL
