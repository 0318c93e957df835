"""``windfleet train --from-capture``: captured windows (gzip JSON Lines in S3 or a
directory) -> the next model, with its lineage in the card and in the registry."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from windfleet import model_contract as mc
from windfleet import payloads
from windfleet.cli import main
from windfleet.cloud.backends import Backend
from windfleet.cloud.dashboard.models import model_row
from windfleet.preprocessing import DataError
from windfleet.training import data as D
from windfleet.training.capture import parse_since, read_captures
from windfleet.training.pipeline import capture_dataset, csv_dataset, simulated_dataset

from tests.aws_fixtures import moto_backend

T0 = 1_764_500_000.0  # 2025-11-30T10:53:20Z
VOLTAGE = mc.FEATURES.index("voltage")
OFFSET = 60.0  # ADC counts on the drifted turbine's voltage: a sensor recalibration


def capture_records(thing: str = "gw1", turbines: int = 2, every: int = 4, model_version: str = "1.0.0",
                    features=None, window_cut: int | None = None) -> list[dict]:
    """Simulated windows as the detector captures them: turbine ``{thing}-t01`` has a
    voltage offset; every 7th window is labelled normal (0), every 11th an anomaly (1),
    every 13th unlabelled but flagged; the rest are unlabelled sampled normal ones."""
    (w,) = D.simulated(5, turbines, 0.05, anomalies_per_hour=0.0, prefix=thing)
    out = []
    for i in range(0, len(w), every):
        t = int(w.source[i])
        rows = w.raw[i].copy()
        if t == 1:
            rows[:, VOLTAGE] += OFFSET
        if window_cut:
            rows = rows[:window_cut]
        label = 0 if i % 7 == 0 else 1 if i % 11 == 0 else None
        flagged = label == 1 or (label is None and i % 13 == 0)
        errors = [2.0 if flagged else 0.1] * len(mc.FEATURES)
        out.append(payloads.capture(thing, f"{thing}-t{t:02d}", model_version, T0 + int(w.ends[i]) / 20.0,
                                    int(w.ends[i]), features or mc.FEATURES, rows, errors, [1.0] * len(errors),
                                    "flagged" if flagged else "sampled", label))
    return out


def objects(records: list[dict], per_object: int = 25, prefix: str = "captures/") -> dict[str, bytes]:
    """The uploader's objects (i15 layout): ``{prefix}{thing}/{YYYY}/{MM}/{DD}/{epoch_ms}-{n}.jsonl.gz``."""
    out = {}
    for n, a in enumerate(range(0, len(records), per_object)):
        batch = records[a:a + per_object]
        ms = int(batch[-1]["ts"] * 1000)
        day = datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y/%m/%d")
        body = "".join(json.dumps(r) + "\n" for r in batch).encode()
        out[f"{prefix}{batch[0]['thing']}/{day}/{ms}-{n}.jsonl.gz"] = gzip.compress(body)
    return out


def write_dir(root: Path, objs: dict[str, bytes]) -> Path:
    for key, body in objs.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root


def expected_normal(records: list[dict], include_flagged: bool = False) -> int:
    return sum(1 for r in records if r["label"] == 0 or (r["label"] is None and (include_flagged or not r["anomaly"])))


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return capture_records()


# ------------------------------------------------------------------------------ reading
def test_a_directory_of_captures_yields_the_normal_windows_per_turbine(records, tmp_path):
    root = write_dir(tmp_path / "caps", objects(records))
    bad = tmp_path / "caps" / "captures" / "gw1" / "junk"
    bad.mkdir(parents=True)
    (bad / "1-0.jsonl.gz").write_bytes(b"not gzip at all")  # an object that is not gzip
    lines = [json.dumps(records[0]), "{not json", json.dumps({**records[1], "rows": [[1.0]]}), "[1, 2]"]
    (bad / "2-0.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))  # 1 duplicate, 3 bad
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records[:3]))
    (bad / "3-0.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # cut short

    got = read_captures(root, log=lambda *_: None)
    assert got.features == list(mc.FEATURES) and got.window == mc.WINDOW
    assert sorted(got.turbines) == ["gw1-t00", "gw1-t01"]
    assert got.windows == expected_normal(records) == got.report.used
    assert got.parent == "1.0.0"
    r = got.report
    assert r.malformed["not_gzip"] == 1 and r.malformed["not_json"] == 1 and r.malformed["truncated"] == 1
    assert r.malformed["wrong_type"] == 1 and r.malformed["not_object"] == 1
    assert r.skipped["duplicate"] >= 1
    assert r.skipped["labelled_anomaly"] == sum(1 for x in records if x["label"] == 1)
    # each turbine's windows in time order, raw model inputs as captured (the offset kept)
    t1 = got.turbines["gw1-t01"]
    assert np.all(np.diff(got.seqs["gw1-t01"]) > 0)
    first = next(x for x in records if x["turbine_id"] == "gw1-t01" and x["label"] != 1 and not x["anomaly"])
    np.testing.assert_allclose(t1[0], np.asarray(first["rows"]))
    assert got.objects and all(o.endswith(".jsonl.gz") and "/junk/" not in o for o in got.objects)


def test_filters_and_the_normal_window_policy(records, tmp_path):
    root = write_dir(tmp_path / "caps", objects(records))
    quiet = {"log": lambda *_: None}
    flagged = read_captures(root, include_flagged=True, **quiet)
    assert flagged.windows == expected_normal(records, include_flagged=True) > expected_normal(records)
    one = read_captures(root, turbines=["gw1-t01"], **quiet)
    assert list(one.turbines) == ["gw1-t01"] and one.report.skipped["other_turbine"] > 0
    cut = sorted(r["ts"] for r in records)[len(records) // 2]
    for since in (cut, datetime.fromtimestamp(cut, timezone.utc).isoformat().replace("+00:00", "Z")):
        late = read_captures(root, since=parse_since(since), **quiet)
        assert late.windows == expected_normal([r for r in records if r["ts"] >= cut])
    assert parse_since("2025-11-30T10:53:20") == T0 and parse_since(str(T0)) == T0
    with pytest.raises(DataError, match="ISO-8601"):
        parse_since("yesterday")
    with pytest.raises(DataError, match="no usable normal windows"):
        read_captures(root, turbines=["gw9-t00"], **quiet)
    # a turbine the old model flags all the time (drift on a healthy turbine, no labels): left
    # out by default, with a hint; --include-flagged learns it
    storm = [{**r, "label": None, "anomaly": True, "reason": "flagged"} if r["turbine_id"] == "gw1-t01" else r
             for r in records]
    lines: list[str] = []
    got = read_captures(write_dir(tmp_path / "storm", objects(storm)), log=lines.append)
    assert list(got.turbines) == ["gw1-t00"] and any("gw1-t01" in m and "--include-flagged" in m for m in lines)
    assert sorted(read_captures(tmp_path / "storm", include_flagged=True, **quiet).turbines) == ["gw1-t00", "gw1-t01"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no capture objects"):
        read_captures(tmp_path / "empty", **quiet)


class _Paged:
    """An S3 client listing two keys per page: the reader must follow continuation tokens."""

    def __init__(self, s3):
        self.s3 = s3

    def list_objects_v2(self, **kwargs):
        return self.s3.list_objects_v2(MaxKeys=2, **kwargs)

    def get_object(self, **kwargs):
        return self.s3.get_object(**kwargs)


@pytest.mark.parametrize("kind", ["local", "moto"])
def test_captures_are_read_from_s3(kind, records, tmp_path, monkeypatch):
    objs = objects(records)
    objs["captures/gw1/notes.txt"] = b"not a capture object"  # other keys under the prefix are ignored
    objs["elsewhere/gw1/2025/11/30/1-0.jsonl.gz"] = next(iter(objs.values()))  # outside the prefix

    def check(backend: Backend, s3) -> None:
        for key, body in objs.items():
            backend.s3.put_object(Bucket=backend.bucket, Key=key, Body=body)
        got = read_captures(f"s3://{backend.bucket}/captures/", s3=s3, log=lambda *_: None)
        assert got.report.objects == sum(1 for k in objs if k.startswith("captures/") and k.endswith(".gz"))
        assert got.windows == expected_normal(records)
        assert all(o.startswith(f"s3://{backend.bucket}/captures/gw1/") for o in got.objects)
        with pytest.raises(DataError, match="NoSuchBucket"):
            read_captures("s3://no-such-bucket/captures/", s3=s3, log=lambda *_: None)

    if kind == "local":
        backend = Backend.local(tmp_path / "home")
        check(backend, backend.s3)
    else:
        with moto_backend(monkeypatch, "us-east-1", bucket="wf-captures") as backend:
            backend.s3.create_bucket(Bucket="wf-captures")
            check(backend, _Paged(backend.s3))


def test_captures_of_two_models_are_refused_with_a_reason(records, tmp_path):
    other = capture_records(thing="gw2", turbines=1, every=20, features=[f"x{i}" for i in range(6)])
    root = write_dir(tmp_path / "a", {**objects(records), **objects(other)})
    with pytest.raises(DataError, match="disagree on features or window length.*--since or --turbines"):
        read_captures(root, log=lambda *_: None)
    few = read_captures(root, turbines=["gw2-t00"], log=lambda *_: None)  # selected apart
    assert few.features[0] == "x0"
    with pytest.raises(DataError, match="too few to train.*--mix simulated or --csv"):
        capture_dataset(few, None)

    short = capture_records(thing="gw3", turbines=1, every=4, window_cut=50)
    root = write_dir(tmp_path / "b", {**objects(records), **objects(short)})
    with pytest.raises(DataError, match="100 samples.*50 samples|50 samples.*100 samples"):
        read_captures(root, log=lambda *_: None)
    # captures from a model with another window train a model of that window, never a mix of both
    caps = read_captures(write_dir(tmp_path / "c", objects(short)), log=lambda *_: None)
    assert caps.window == 50
    with pytest.raises(DataError, match="window is 100"):
        capture_dataset(caps, simulated_dataset(0, 1, 0.05, test=False))
    ds = capture_dataset(caps, None)
    assert (ds.window, ds.train.raw.shape[1], ds.test) == (50, 50, None)


def test_each_captured_turbine_is_a_source_split_in_time(records, tmp_path):
    caps = read_captures(write_dir(tmp_path / "caps", objects(records)), log=lambda *_: None)
    sim = simulated_dataset(0, 1, 0.05, test=False)
    ds = capture_dataset(caps, sim, since=T0, log=lambda *_: None)
    new = {0: "sim"} | {1: "gw1-t00", 2: "gw1-t01"}
    for stage in (ds.train, ds.val, ds.calib):
        assert set(np.unique(stage.source)) == set(new)
    # in time: every captured turbine's training windows end before its validation windows start
    for s in (1, 2):
        assert ds.train.ends[ds.train.source == s].max() < ds.val.ends[ds.val.source == s].min()
        assert ds.val.ends[ds.val.source == s].max() < ds.calib.ends[ds.calib.source == s].min()
    drifted = ds.train.raw[ds.train.source == 2][..., VOLTAGE].mean()
    assert drifted - ds.train.raw[ds.train.source == 1][..., VOLTAGE].mean() > OFFSET / 2
    assert ds.lineage == {"parent": "1.0.0", "captures": caps.objects, "capture_windows": caps.windows,
                          "turbines": ["gw1-t00", "gw1-t01"], "since": "2025-11-30T10:53:20+00:00",
                          "mixed_with": "simulated"}


def test_captures_mix_with_a_csv_of_the_same_features(records, tmp_path):
    caps = read_captures(write_dir(tmp_path / "caps", objects(records)), log=lambda *_: None)
    (w,) = D.simulated(9, 1, 0.05, anomalies_per_hour=0.0)
    rows = w.raw[::10].reshape(-1, len(mc.FEATURES))  # windows of stride 10 tile the stream
    csv = tmp_path / "site.csv"
    csv.write_text(",".join(mc.FEATURES) + "\n" + "\n".join(",".join(f"{v:.6g}" for v in r) for r in rows) + "\n")
    ds = capture_dataset(caps, csv_dataset(csv, mc.FEATURES, window=caps.window), log=lambda *_: None)
    assert ds.lineage["mixed_with"] == "csv:site.csv" and ds.window == mc.WINDOW
    assert set(np.unique(ds.train.source)) == {0, 1, 2}  # the CSV's segment, then each captured turbine
    other = list(reversed(mc.FEATURES))
    with pytest.raises(DataError, match="differ from the mixed data"):
        capture_dataset(caps, csv_dataset(csv, other, window=caps.window))


# ------------------------------------------------------------------- train -> register
@pytest.fixture(scope="module")
def retrained(records, tmp_path_factory):
    """``windfleet train --from-capture s3://...`` on the local store.  Captures alone
    (``--mix none``) and one epoch keep it cheap; the simulated mix is checked above."""
    root = tmp_path_factory.mktemp("retrain")
    home = root / "home"
    backend = Backend.local(home)
    for key, body in objects(records).items():
        backend.s3.put_object(Bucket=backend.bucket, Key=key, Body=body)
    runner = CliRunner()
    out = root / "model"
    res = runner.invoke(main, ["train", "--from-capture", f"s3://{backend.bucket}/captures/", "--home", str(home),
                               "--mix", "none", "--epochs", "1",
                               "--version", "1.1.0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return {"home": home, "out": out, "backend": backend, "summary": json.loads(res.stdout.splitlines()[-1]),
            "stderr": res.stderr}


def test_train_from_capture_writes_lineage_into_the_card(retrained, records):
    card = mc.load_card(retrained["out"])
    lineage = card["lineage"]
    assert lineage["parent"] == "1.0.0" and lineage["mixed_with"] is None
    assert lineage["capture_windows"] == expected_normal(records) and lineage["turbines"] == ["gw1-t00", "gw1-t01"]
    assert lineage["captures"] and all(c.startswith("s3://") and c.endswith(".jsonl.gz") for c in lineage["captures"])
    assert card["window"]["size"] == mc.WINDOW and card["features"] == list(mc.FEATURES)
    assert card["training"]["data"]["kind"] == "capture"
    assert "autoencoder" not in card["metrics"]  # captures alone: no labelled held-out fleet, said so
    assert "false-alarm gate is not applied" in retrained["stderr"]
    assert retrained["summary"]["lineage"]["captures"] == len(lineage["captures"])
    assert "normal windows used" in retrained["stderr"]


def test_the_registry_records_and_shows_the_lineage(retrained):
    runner = CliRunner()
    home = ["--home", str(retrained["home"])]
    res = runner.invoke(main, ["registry", "register", str(retrained["out"]), *home])
    assert res.exit_code == 0, res.output
    card = mc.load_card(retrained["out"])
    [info] = json.loads(runner.invoke(main, ["registry", "list", "--json", *home]).stdout)
    assert info["lineage"]["parent"] == "1.0.0"
    assert info["lineage"]["captures"] == len(card["lineage"]["captures"])
    assert info["lineage"]["capture_windows"] == card["lineage"]["capture_windows"]
    assert info["lineage"]["turbines"] == ["gw1-t00", "gw1-t01"]
    meta = retrained["backend"].sagemaker.describe_model_package(ModelPackageName=info["arn"])[
        "CustomerMetadataProperties"]
    assert len(meta) <= 50 and meta["lineage:parent"] == "1.0.0"
    history = runner.invoke(main, ["registry", "history", "1", *home]).stdout
    assert "parent 1.0.0" in history and f"{info['lineage']['captures']} capture objects" in history
    listed = runner.invoke(main, ["registry", "list", *home]).stdout
    assert "1.0.0" in listed.splitlines()[1]  # the PARENT column
    row = model_row(info, card)  # the dashboard's registry page
    assert row["lineage"] == (f"parent 1.0.0, {len(card['lineage']['captures'])} capture objects, "
                              f"{card['lineage']['capture_windows']} windows")


def test_from_capture_cli_refusals(tmp_path, records):
    runner = CliRunner()
    out = str(tmp_path / "m")
    for args, message in [
        (["--since", "2025-01-01"], "apply to --from-capture only"),
        (["--turbines", "a,b"], "applies to --from-capture only"),
        (["--from-capture", str(tmp_path / "missing")], "no such directory"),
        (["--from-capture", "s3://b/captures/", "--home", str(tmp_path / "nohome")], "no local store"),
        (["--from-capture", str(tmp_path), "--window", "50"], "keeps the captured windows' length"),
    ]:
        res = runner.invoke(main, ["train", "--out", out, *args])
        assert res.exit_code != 0 and message in res.stderr, (args, res.output)
        assert not Path(out).exists()


def test_long_lineage_fits_the_package_metadata_with_every_metric_and_decision(tmp_path):
    """Thousands of capture objects, 40 metrics and the last MAX_DECISIONS decisions still fit
    SageMaker's 50 entries of <= 256 allowed characters (the local store enforces both)."""
    from windfleet.cloud.registry import MAX_DECISIONS, Registry, metadata_char_ok
    from windfleet.cloud.testing import fake_model_dir

    d = fake_model_dir(tmp_path / "m", "2.0.0")
    card = json.loads((d / "model.json").read_text())
    card["metrics"] = {f"m{i}": i / 100 for i in range(40)}
    captures = [f"s3://b/captures/gw{i % 50}/2026/11/30/{1764500000000 + i}-{i}.jsonl.gz" for i in range(3000)]
    card["lineage"] = {"parent": "1.0.0+build.7", "captures": captures, "capture_windows": 123456,
                       "turbines": [f"gw{i}-t{j:02d}" for i in range(50) for j in range(5)], "since": None,
                       "mixed_with": "simulated"}
    (d / "model.json").write_text(json.dumps(card))
    backend = Backend.local(tmp_path / "home")
    reg = Registry(backend)
    info = reg.register(d)
    for i in range(MAX_DECISIONS + 1):
        reg.reject(info["version"], f"round {i}", actor="bob")
    meta = backend.sagemaker.describe_model_package(ModelPackageName=info["arn"])["CustomerMetadataProperties"]
    assert len(meta) <= 50 and all(len(v) <= 256 and all(map(metadata_char_ok, v)) for v in meta.values())
    lineage = reg.get(info["version"])["lineage"]
    assert (lineage["parent"], lineage["captures"], lineage["capture_windows"]) == ("1.0.0+build.7", 3000, 123456)
    assert lineage["captures_prefix"] == "s3://b/captures/"  # the common prefix, cut at a "/"
    assert lineage["captures_sha256"] == hashlib.sha256("\n".join(sorted(captures)).encode()).hexdigest()
    assert lineage["turbines"][0] == "gw0-t00" and len(reg.get(info["version"])["decisions"]) == MAX_DECISIONS
