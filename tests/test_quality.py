"""Detection quality is a tested property (issue 11): `windfleet train --quick` at two
fixed seeds reaches held-out F1 >= 0.95 and FAR <= 1 % and beats IsolationForest and
PCA on the same windows; a model that misses its FAR target on held-out data is
refused with one line and never written."""

import json

import pytest
from click.testing import CliRunner

from windfleet import model_contract as mc
from windfleet.cli import main

SEEDS = (1, 2)  # the demo's v1 and v2 (windfleet/demo.py)


@pytest.fixture(scope="module", params=SEEDS)
def quick_model(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / f"seed{request.param}"
    res = CliRunner().invoke(main, ["train", "--quick", "--seed", str(request.param), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quick_training_meets_the_targets_on_held_out_turbines(quick_model):
    out, summary = quick_model
    evaluation = json.loads((out / "evaluation.json").read_text())
    ae = evaluation["detectors"]["autoencoder"]["overall"]
    assert summary["autoencoder"]["f1"] == ae["f1"]
    assert ae["f1"] >= 0.95 and ae["false_alarm_rate"] <= 0.01, ae
    # every fault kind, yaw misalignment included (issue 11): recall >= 0.90
    per_kind = evaluation["detectors"]["autoencoder"]["per_kind"]
    assert min(k["recall"] for k in per_kind.values()) >= 0.90, {n: k["recall"] for n, k in per_kind.items()}
    for baseline in ("isolation_forest", "pca"):
        assert ae["f1"] > evaluation["detectors"][baseline]["overall"]["f1"], baseline
    card = mc.load_card(out)
    assert card["window"] == {"size": 100, "stride": 10, "shape": [6, 10, 10]}
    assert card["metrics"]["autoencoder"]["false_alarm_rate"] == ae["false_alarm_rate"]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary directories left behind


def test_a_model_that_misses_its_far_target_is_refused_and_not_written(tmp_path, monkeypatch):
    from windfleet.training import thresholds as th

    monkeypatch.setattr(th, "calibrate", lambda errors, rate=0.001: errors.min(axis=0))  # thresholds that cannot hold
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--turbines", "1", "--hours", "0.05", "--epochs", "1", "--out", str(out)])
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "held-out false-alarm rate" in lines[0] and "no model written" in lines[0], res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
