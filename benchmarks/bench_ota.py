"""Over-the-air rollout: seconds from ``registry approve`` to every gateway on the new model, and
readings lost in the swap, for fleets of 1 (the baseline of this run), 3 and 10 gateways.

Each point is a whole ``windfleet demo`` run (real Mosquitto, one device runtime per gateway
with the four components, the local deployment service) with pre-trained packages, so training
is out of the measurement.  Per point it records the v2 rollout (approve -> every device
SUCCEEDED with the new model; then -> every device *scoring* with it), the readings lost in the
swap (windows missing from each turbine's score sequence x stride), and the corrupt v3's
rollback.  Ratios are against the 1-gateway point measured in the same run.

    .venv/bin/python benchmarks/bench_ota.py [--gateways 1,3,10] [--turbines-per-gateway 2]

Writes benchmarks/results/ota.json and ota.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def quick_model(out: Path, seed: int) -> Path:
    from windfleet.training.pipeline import train_simulated

    train_simulated(out, seed=seed, turbines=1, hours=0.25, epochs=3, evaluate=False, progress=False,
                    log=lambda *_: None)
    return out


def point(gateways: int, turbines: int, v1: Path, v2: Path, work: Path, duration: float) -> dict:
    from windfleet.demo import Console, DemoOptions, run_demo

    lines: list[str] = []
    opts = DemoOptions(gateways=gateways, turbines_per_gateway=turbines, duration=duration, work=work,
                       model_v1=v1, model_v2=v2, settle=3.0)
    t0 = time.monotonic()
    report = run_demo(opts, Console(stages=9, echo=lines.append))
    update = next(r for r in report["rollouts"] if r["kind"] == "update")
    install = next(r for r in report["rollouts"] if r["kind"] == "install")
    rollback = report["rollbacks"][0]
    return {
        "gateways": gateways, "turbines_per_gateway": turbines,
        "rollout_seconds": update["seconds"], "rollout_seconds_until_scoring": update["seconds_until_scoring"],
        "readings_lost": update["readings_lost"], "devices_on_version": update["devices_on_version"],
        "install_seconds": install["seconds"],
        "rollback_seconds": rollback["seconds"], "rollback_readings_lost": rollback["readings_lost"],
        "devices_rolled_back": rollback["devices_rolled_back"],
        "telemetry_lost": report["telemetry_lost"], "run_seconds": round(time.monotonic() - t0, 1),
    }


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["gateways"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, [p["rollout_seconds"] for p in points], "o-", label="approve -> all SUCCEEDED")
    ax.plot(xs, [p["rollout_seconds_until_scoring"] for p in points], "s--", label="approve -> all scoring with v2")
    ax.plot(xs, [p["rollback_seconds"] for p in points], "^:", label="corrupt v3 -> all rolled back")
    ax.axhline(15, color="grey", lw=0.8, ls="--", label="target (10 gateways)")
    ax.set_xlabel("gateways")
    ax.set_ylabel("seconds")
    ax.set_title("Over-the-air model rollout (local backend, 2 cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", default="1,3,10", help="comma-separated fleet sizes; the first is the baseline")
    ap.add_argument("--turbines-per-gateway", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of streaming before the approval")
    args = ap.parse_args()
    sizes = [int(x) for x in args.gateways.split(",")]

    with tempfile.TemporaryDirectory(prefix="windfleet-ota-") as tmp:
        tmp = Path(tmp)
        v1, v2 = quick_model(tmp / "m1", 1), quick_model(tmp / "m2", 2)
        points = []
        for n in sizes:
            print(f"-- {n} gateway(s) x {args.turbines_per_gateway} turbines", flush=True)
            points.append(point(n, args.turbines_per_gateway, v1, v2, tmp / f"run-{n}", args.duration))
            print(json.dumps(points[-1]), flush=True)

    base = points[0]["rollout_seconds"] or 1e-9
    for p in points:
        p["rollout_ratio_to_baseline"] = round(p["rollout_seconds"] / base, 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "ota", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "baseline": f"{sizes[0]} gateway(s), same run", "points": points}
    (RESULTS / "ota.json").write_text(json.dumps(result, indent=2))
    plot(points, RESULTS / "ota.png")

    head = f"{'gateways':>8} {'rollout s':>10} {'x base':>7} {'scoring s':>10} {'lost':>5} {'rollback s':>11} {'on v2':>6}"
    print(head)
    for p in points:
        print(f"{p['gateways']:>8} {p['rollout_seconds']:>10.1f} {p['rollout_ratio_to_baseline']:>7.2f} "
              f"{p['rollout_seconds_until_scoring']:>10.1f} {p['readings_lost']:>5} {p['rollback_seconds']:>11.1f} "
              f"{p['devices_on_version']:>3}/{p['gateways']:<2}")
    print(f"wrote {RESULTS / 'ota.json'} and {RESULTS / 'ota.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
