"""CSV training and scoring, and every bad input of the issue (item 8)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from windfleet import model_contract as mc
from windfleet.cli import main
from windfleet.preprocessing import raw_features
from windfleet.simulation import Anomaly, Turbine
from windfleet.training.score import skab_metrics


def write_csv(path, n=3000, sep=";", anomaly_at=(2200, 2500), bad=None):
    """Simulated readings as a SKAB-like CSV: datetime;roll;...;voltage;anomaly."""
    turbine = Turbine("t", 3, anomalies=[Anomaly("voltage_fault", anomaly_at[0], anomaly_at[1] - anomaly_at[0], 0.9)])
    data = turbine.step(n)
    x = raw_features(data)
    lines = [sep.join(["datetime", *mc.FEATURES, "anomaly"])]
    for i in range(n):
        cells = [f"2024-01-01 00:{i // 1200:02d}:{(i // 20) % 60:02d}", *(f"{v:.6g}" for v in x[i]),
                 "1.0" if data["label"][i] else "0.0"]
        if bad and i in bad[0]:
            cells[1 + mc.FEATURES.index(bad[1])] = bad[2]
        lines.append(sep.join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


FEATS = ",".join(mc.FEATURES)


@pytest.fixture(scope="module")
def csv_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    src = write_csv(root / "train.csv")
    out = root / "model"
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", FEATS, "--label", "anomaly",
                                    "--sep", ";", "--out", str(out), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    return src, out


def test_csv_train_writes_a_package_with_the_csv_features(csv_model):
    _, out = csv_model
    card = mc.load_card(out)
    assert card["features"] == list(mc.FEATURES)
    assert card["training"]["data"]["kind"] == "csv"
    assert "autoencoder" in json.loads((out / "evaluation.json").read_text())["detectors"]


def test_csv_train_on_other_columns(tmp_path):
    src = write_csv(tmp_path / "x.csv", sep=",")
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", "rps,voltage,pitch",
                                    "--out", str(tmp_path / "m"), "--epochs", "1", "--no-eval"])
    assert res.exit_code == 0, res.output
    card = mc.load_card(tmp_path / "m")
    assert card["features"] == ["rps", "voltage", "pitch"] and card["window"]["shape"] == [3, 10, 10]
    assert card["statistics"]["circular"] == []


def test_score_one_row_per_input_row_and_skab_metrics(csv_model, tmp_path):
    src, model = csv_model
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--csv", str(src), "--sep", ";",
                                    "--label", "anomaly", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"f1", "far", "mar"}
    rows = out.read_text().splitlines()
    assert rows[0] == "row,anomaly,score,label" and len(rows) == 3001
    first = [r.split(",") for r in rows[1:101]]
    assert len({(r[1], r[2]) for r in first}) == 1 and float(first[0][2]) > 0  # rows 0-99: the first window's verdict
    pred = np.array([int(r.split(",")[1]) for r in rows[1:]])
    assert pred[2300:2500].mean() > 0.5  # a 90 % voltage fault is found


def test_skab_metrics_definitions():
    m = skab_metrics(np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 0, 1, 1]))
    assert m["f1"] == pytest.approx(100 * 2 * 2 / (2 * 2 + 1 + 1), abs=0.01)
    assert m["far"] == pytest.approx(100 / 3, abs=0.01) and m["mar"] == pytest.approx(100 / 3, abs=0.01)


def _check_failed(res, out_dir, needle):
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], res.output
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


@pytest.mark.parametrize("case,needle", [
    ("missing_file", "no such file"),
    ("missing_column", "missing column 'vibration'"),
    ("non_numeric", "is not a number"),
    ("too_few_rows", "at least"),
    ("long_gap", "consecutive non-finite"),
])
def test_bad_csv_for_training(tmp_path, case, needle):
    src, feats = tmp_path / "in.csv", FEATS
    if case == "missing_column":
        write_csv(src, n=500)
        feats = "roll,vibration"
    elif case == "non_numeric":
        write_csv(src, n=600, bad=([300], "rps", "fast"))
    elif case == "too_few_rows":
        write_csv(src, n=120)
    elif case == "long_gap":
        write_csv(src, n=600, bad=(range(100, 130), "voltage", "nan"))
    out = tmp_path / "model"
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", feats, "--sep", ";",
                                    "--out", str(out), "--epochs", "1"])
    _check_failed(res, out, needle)


def test_short_gaps_are_interpolated_not_rejected(csv_model, tmp_path):
    _, model = csv_model
    src = write_csv(tmp_path / "gaps.csv", n=400, bad=([50, 51, 52, 200], "rps", ""))
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--csv", str(src), "--sep", ";",
                                    "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 401


@pytest.mark.parametrize("case,needle", [
    ("tampered", "does not match"),
    ("too_few_rows", "at least 100"),
    ("wrong_sep", "wrong --sep"),
    ("feature_count", "the model takes 6"),
])
def test_bad_input_for_scoring(csv_model, tmp_path, case, needle):
    src, model = csv_model
    args = ["score", "--model", str(model), "--csv", str(src), "--sep", ";"]
    if case == "tampered":
        import shutil
        model = tmp_path / "tampered"
        shutil.copytree(csv_model[1], model)
        with open(model / mc.MODEL_FILE, "ab") as fh:
            fh.write(b"\0")
        args[2] = str(model)
    elif case == "too_few_rows":
        args[4] = str(write_csv(tmp_path / "short.csv", n=60))
    elif case == "wrong_sep":
        args[-1] = ","
    elif case == "feature_count":
        args += ["--features", "rps,voltage"]
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(main, args + ["--out", str(out)])
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], res.output
    assert not out.exists() and list(tmp_path.glob(".pred.csv*")) == []
