"""Training benchmark: `windfleet train` wall time (--quick and the default) and
windows/s scored by onnxruntime (1 intra-op thread, 1 inter-op, spinning off) vs
torch eager (1 thread) at batch 1 and 256, in the same run on the same model.

    .venv/bin/python benchmarks/bench_training.py [--skip-default] [--seconds 3]

Writes benchmarks/results/training.json and prints a table with ratios.  The
machine is shared: CPU time (user+sys of the training process) is reported next
to wall time because it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training.json"


def time_train(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).parent / "windfleet"), "train", "--out", f"{tmp}/m", *args],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"train {args} failed: {proc.stderr.strip().splitlines()[-1:]}")
        card = json.loads(Path(f"{tmp}/m/model.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"args": args, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "epochs": card["metrics"]["epochs"],
            **{k: card["metrics"].get(k) for k in ("autoencoder", "isolation_forest", "pca", "per_kind_f1")}}


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn()
        n += batch
    return n / elapsed


def scoring(seconds: float) -> dict:
    import torch

    from windfleet import model_contract as mc
    from windfleet.training.export import export_onnx, session
    from windfleet.training.model import ConvAutoencoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ConvAutoencoder().eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path, mc.self_test_input())
        sess = session(path, threads=1)
        for batch in (1, 256):
            x = np.random.default_rng(batch).standard_normal((batch, 6, 10, 10)).astype(np.float32)
            xt = torch.from_numpy(x)
            ort_rate = rate(lambda: sess.run([mc.OUTPUT_NAME], {mc.INPUT_NAME: x}), batch, seconds)
            with torch.no_grad():
                torch_rate = rate(lambda: model(xt), batch, seconds)
            out[f"batch_{batch}"] = {"onnxruntime_windows_per_s": round(ort_rate, 1),
                                     "torch_eager_windows_per_s": round(torch_rate, 1),
                                     "ratio_onnxruntime_over_torch": round(ort_rate / torch_rate, 2),
                                     "onnxruntime_ms_per_call": round(1000 * batch / ort_rate, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-default", action="store_true", help="time --quick only")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per scoring case")
    a = ap.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_at_start": os.getloadavg()},
              "scoring": scoring(a.seconds), "training": {"quick": time_train(["--quick"])}}
    if not a.skip_default:
        result["training"]["default"] = time_train([])
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':<28}{'onnxruntime w/s':>18}{'torch w/s':>12}{'ratio':>8}")
    for k, v in result["scoring"].items():
        print(f"{k:<28}{v['onnxruntime_windows_per_s']:>18,.0f}{v['torch_eager_windows_per_s']:>12,.0f}"
              f"{v['ratio_onnxruntime_over_torch']:>8.2f}")
    print(f"{'training':<28}{'wall s':>18}{'cpu s':>12}{'F1':>8}")
    for k, v in result["training"].items():
        f1 = (v["autoencoder"] or {}).get("f1", float("nan"))
        print(f"{k:<28}{v['wall_s']:>18.1f}{v['cpu_s']:>12.1f}{f1:>8.3f}")
    print(f"quick / default wall: {result['training']['quick']['wall_s'] / result['training']['default']['wall_s']:.2f}"
          if "default" in result["training"] else "")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
