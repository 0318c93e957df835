"""CSV mode for short real recordings (issue 11): 300 rows train, window/stride
options, every row scored, 0/1 labels only, non-finite and huge values handled
as the streaming detector handles them."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from windfleet import model_contract as mc
from windfleet.cli import main
from windfleet.preprocessing import raw_features
from windfleet.simulation import Anomaly, Turbine

FEATS = ",".join(mc.FEATURES)


def recording(path, seed, n=300, fault=("voltage_fault", 200, 260), sep="\t", cells=None, skip=0):
    """A short simulated recording as a CSV: time, the six features, a 0/1 label.
    ``skip``: start that many samples into the turbine's stream (a later recording)."""
    kind, a, b = fault
    data = Turbine("t", seed, anomalies=[Anomaly(kind, skip + a, b - a, 0.9)]).step(skip + n)
    data = {k: v[skip:] for k, v in data.items()}
    x = raw_features(data)
    lines = [sep.join(["time", *mc.FEATURES, "anomaly"])]
    for i in range(n):
        row = [f"{i / 20:.2f}", *(f"{v:.6g}" for v in x[i]), "1" if data["label"][i] else "0"]
        for (r, col), value in (cells or {}).items():
            if r == i:
                row[col] = value
        lines.append(sep.join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    src = recording(root / "train.tsv", seed=3)
    out = root / "model"
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", FEATS, "--label", "anomaly",
                                    "--sep", "\t", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return root, out


def score(model, src, out, *extra):
    res = CliRunner().invoke(main, ["score", "--model", str(model), "--csv", str(src), "--sep", "\t",
                                    "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_300_rows_train_a_model_whose_card_records_window_stride_and_features(short_model):
    _, model = short_model
    card = mc.load_card(model)
    assert card["features"] == list(mc.FEATURES)
    assert card["window"] == {"size": 20, "stride": 2, "shape": [6, 4, 5]}  # defaults for 300 rows


def test_a_300_row_model_finds_the_fault_in_the_next_recording(short_model):
    root, model = short_model
    other = recording(root / "other.tsv", seed=3, fault=("voltage_fault", 140, 220), skip=300)
    metrics = score(model, other, root / "pred.csv", "--label", "anomaly")
    rows = (root / "pred.csv").read_text().splitlines()
    assert len(rows) == 301  # every input row gets a verdict
    # point-wise, in %: a window flags the fault's rows, and the window's length after
    # it (up to 19 of the 220 normal rows here are late verdicts); SKAB-like figures
    assert metrics["f1"] >= 70 and metrics["far"] <= 30 and metrics["mar"] <= 10, metrics


def test_window_and_stride_options(tmp_path):
    src = recording(tmp_path / "r.tsv", seed=4, n=400)
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", "rps,voltage,wind_speed_rps",
                                    "--sep", "\t", "--window", "30", "--stride", "5", "--epochs", "2",
                                    "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    card = mc.load_card(out)
    assert card["window"] == {"size": 30, "stride": 5, "shape": [3, 5, 6]}
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6)).astype(np.float32)
    from windfleet.training.export import onnx_outputs
    assert onnx_outputs(out / mc.MODEL_FILE, x).shape == x.shape


@pytest.mark.parametrize("value", ["2", "-1", "0.5", ""])
def test_labels_must_be_0_or_1(tmp_path, value):
    label_col = 1 + len(mc.FEATURES)
    src = recording(tmp_path / "r.tsv", seed=5, cells={(50, label_col): value})
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--csv", str(src), "--features", FEATS, "--label", "anomaly",
                                    "--sep", "\t", "--out", str(out)])
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "is not 0 or 1" in lines[0] and "line 52" in lines[0], res.output
    assert not out.exists()


def test_huge_and_non_finite_values_are_scored_like_the_detector(short_model, tmp_path):
    _, model = short_model
    volt = 1 + mc.FEATURES.index("voltage")
    src = recording(tmp_path / "bad.tsv", seed=6, fault=("voltage_fault", 280, 290),
                    cells={(100, volt): "1e308", (200, volt): "nan", (201, 1): "inf"})
    metrics = score(model, src, tmp_path / "p.csv")
    rows = [r.split(",") for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert len(rows) == 300 and all(r[1] in "01" for r in rows)
    # 1e308 overflows the windows that hold it (the first ends at row 101): anomalous, score inf, counted
    assert rows[101][1] == "1" and rows[101][2] == "inf" and metrics["windows_non_finite"] >= 1
    assert not any(np.isnan(float(r[2])) for r in rows)  # never NaN counted as normal
    # NaN/inf rows are dropped like a reading with one: windowing restarts after them
    assert metrics["rows_non_finite"] == 2
