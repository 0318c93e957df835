"""Ingest rate and dashboard page load, with baselines measured in the same run.

    .venv/bin/python benchmarks/bench_dashboard.py [--quick]

1. Ingest: synthetic fleet telemetry (real payload builders, 20 records per
   message) into :class:`TelemetryStore` on ONE core (CPU affinity), in batches
   of 500 messages as the ingest service commits them, and one message per
   transaction.  Baseline: the same score rows inserted with a bare
   ``sqlite3.executemany`` into one unindexed table (same PRAGMAs) — the floor
   of what SQLite costs, without decoding, validation, dedupe or summaries.
2. Page load: 50 turbines (5 gateways x 10) with an hour of scores at 2 per
   second per turbine (360,000 windows), served by uvicorn; Chromium measures
   from navigation until the page has rendered its data (overview table with 50
   turbines; a turbine page with all 7 charts drawn).  Baseline: the same pages
   over an empty store.  Also the JSON API latency.
3. Fleet page at 200 gateways (x 5 turbines, two minutes of scores, each a core
   device of the local deployment service with a deployment in progress): the
   overview until its first page of 50 gateways, the state counts and the
   deployment's progress are drawn, with the per-device deployment lookups
   done afresh for every load (cache cleared).  Baseline: the empty store's page.

Prints a table; writes benchmarks/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from windfleet import payloads
from windfleet.cloud.dashboard.app import create_app
from windfleet.cloud.dashboard.synth import Episode, fleet_messages
from windfleet.cloud.ingest import TelemetryStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.browser_fixtures import Served, chromium  # noqa: E402 - the repository root is on the path only now

RESULTS = Path(__file__).parent / "results" / "dashboard.json"


def one_core() -> str:
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def make_messages(things: int, turbines: int, seconds: float, start: float) -> list[bytes]:
    names = [f"gw{i:02d}" for i in range(things)]
    episodes = [Episode(f"{n}-t01", start + seconds * 0.5, start + seconds * 0.5 + 30) for n in names]
    return [payloads.encode(m) for _, m in fleet_messages(names, turbines, start, seconds, period_s=0.5,
                                                         records_per_message=20, episodes=episodes)]


def bench_ingest(tmp: Path, messages: list[bytes]) -> dict:
    records = sum(len(json.loads(m)["records"]) for m in messages)
    out = {"messages": len(messages), "records": records}

    store = TelemetryStore(tmp / "batched.sqlite")
    t0 = time.perf_counter()
    for i in range(0, len(messages), 500):
        store.ingest_many(messages[i:i + 500])
    out["batched_s"] = time.perf_counter() - t0
    store.close()

    subset = messages[: max(1, len(messages) // 5)]
    store = TelemetryStore(tmp / "single.sqlite")
    t0 = time.perf_counter()
    for m in subset:
        store.ingest(m)
    out["single_s"] = time.perf_counter() - t0
    out["single_messages"] = len(subset)
    store.close()

    # baseline: bare executemany of the same score rows (already decoded: decoding is ours to pay)
    rows = []
    for m in messages:
        msg = json.loads(m)
        for r in msg["records"]:
            if r["type"] == "score":
                b = r["body"]
                rows.append((msg["thing"], b["turbine_id"], b["ts"], b["model_version"], b["window_end_seq"],
                             b["score"], int(b["anomaly"]), json.dumps(b["feature_errors"]),
                             json.dumps(b["thresholds"]), json.dumps(b["anomalous_features"])))
    conn = sqlite3.connect(tmp / "raw.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE s (thing, turbine_id, ts, model_version, seq, score, anomaly, e, t, a)")
    t0 = time.perf_counter()
    per_message = max(1, len(rows) // len(messages))
    for i in range(0, len(rows), 500 * per_message):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO s VALUES (?,?,?,?,?,?,?,?,?,?)", rows[i:i + 500 * per_message])
        conn.execute("COMMIT")
    out["raw_s"] = time.perf_counter() - t0
    out["raw_rows"] = len(rows)
    conn.close()

    out["batched_msgs_per_s"] = len(messages) / out["batched_s"]
    out["batched_records_per_s"] = records / out["batched_s"]
    out["single_msgs_per_s"] = len(subset) / out["single_s"]
    out["raw_rows_per_s"] = len(rows) / out["raw_s"]
    out["ratio_store_vs_raw_rows"] = out["batched_records_per_s"] / out["raw_rows_per_s"]
    return out


def measure_pages(browser, url: str, turbine: str | None, repeats: int) -> dict:
    out: dict[str, list[float]] = {"overview_ms": [], "turbine_ms": [], "api_fleet_ms": [], "api_scores_ms": []}
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    import urllib.request

    for _ in range(repeats):
        t0 = time.perf_counter()
        page.goto(url + "/")
        page.wait_for_selector("table#fleet")
        out["overview_ms"].append((time.perf_counter() - t0) * 1000)
        if turbine:
            t0 = time.perf_counter()
            page.goto(url + f"/turbines/{turbine}")
            page.wait_for_function("() => document.querySelectorAll('.chart[data-points]').length === 7")
            out["turbine_ms"].append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            urllib.request.urlopen(url + f"/api/turbines/{turbine}/scores?limit=2000").read()
            out["api_scores_ms"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        urllib.request.urlopen(url + "/api/fleet").read()
        out["api_fleet_ms"].append((time.perf_counter() - t0) * 1000)
    context.close()
    return {k: statistics.median(v) for k, v in out.items() if v}


def fleet_of_200(tmp: Path, gateways: int = 200, turbines: int = 5, seconds: float = 120.0):
    """``(store, greengrass)``: telemetry of ``gateways`` gateways and a local deployment
    service where each is a core device of the thing group, half done with a deployment."""
    from windfleet.cloud import deployer
    from windfleet.cloud.backends import Backend
    from windfleet.cloud.testing import fake_build

    things = [f"gw{i:03d}" for i in range(gateways)]
    store = TelemetryStore(tmp / "fleet200.sqlite")
    now = time.time()
    messages = [payloads.encode(m) for _, m in fleet_messages(
        things, turbines, now - seconds, seconds, period_s=2.0, records_per_message=20,
        episodes=[Episode(f"{t}-t01", now - 30, now + 1) for t in things[::20]])]
    for i in range(0, len(messages), 500):
        store.ingest_many(messages[i:i + 500])
    backend = Backend.local(tmp / "home200", thing_group="fleet")
    deployer.publish(backend, fake_build(tmp / "gb200"))
    gg = backend.greengrassv2
    for thing in things:
        gg.register_core_device(thing, ["fleet"])
    dep = deployer.deploy_suite(backend)
    for i, thing in enumerate(things[: gateways // 2]):
        failed = i % 10 == 9  # 10 %: under the abort threshold, so the rollout goes on
        gg.report_device_status(thing, dep["deploymentId"], "FAILED" if failed else "SUCCEEDED",
                                "model self-test failed" if failed else None)
    return store, gg


def measure_fleet_page(browser, url: str, dashboard, repeats: int) -> dict:
    import urllib.request

    out: dict[str, list[float]] = {"overview_ms": [], "api_fleet_page_ms": []}
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    for _ in range(repeats):
        dashboard.forget()
        t0 = time.perf_counter()
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('table#fleet tr.gateway').length === 50"
                               " && document.querySelector('[data-state-count=healthy]')"
                               " && document.querySelector('.progress-box')")
        out["overview_ms"].append((time.perf_counter() - t0) * 1000)
        dashboard.forget()
        t0 = time.perf_counter()
        urllib.request.urlopen(url + "/api/fleet?offset=0&limit=50").read()
        out["api_fleet_page_ms"].append((time.perf_counter() - t0) * 1000)
    context.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 minutes of data instead of an hour")
    args = parser.parse_args()
    pinned = one_core()
    seconds = 600 if args.quick else 3600
    results: dict = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                 "cpus": os.cpu_count(), "affinity": pinned},
                     "fleet": {"gateways": 5, "turbines": 50, "seconds_of_data": seconds, "scores_per_s_per_turbine": 2}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        start = time.time() - seconds
        t0 = time.perf_counter()
        messages = make_messages(5, 10, seconds, start)
        results["generate_s"] = time.perf_counter() - t0
        results["ingest"] = bench_ingest(tmp, messages)

        full = TelemetryStore(tmp / "batched.sqlite")
        empty = TelemetryStore(tmp / "empty.sqlite")
        results["store_bytes"] = (tmp / "batched.sqlite").stat().st_size
        t0 = time.perf_counter()
        store200, gg200 = fleet_of_200(tmp)
        results["fleet_200_setup_s"] = time.perf_counter() - t0
        with chromium() as browser:
            try:
                for name, store, turbine in (("empty", empty, None), ("loaded", full, "gw00-t01")):
                    served = Served(create_app(store, token="bench"))
                    try:
                        measure_pages(browser, served.url, turbine, 1)  # warm up
                        results[f"pages_{name}"] = measure_pages(browser, served.url, turbine, 5)
                    finally:
                        served.close()
                app = create_app(store200, greengrass=gg200, token="bench")
                served = Served(app)
                try:
                    measure_fleet_page(browser, served.url, app.state.dashboard, 1)  # warm up
                    results["pages_200_gateways"] = {
                        "gateways": 200, "turbines": 1000, "page_size": 50,
                        **measure_fleet_page(browser, served.url, app.state.dashboard, 5)}
                finally:
                    served.close()
            finally:
                store200.close()
        full.close()
        empty.close()
    results["ratio_overview_loaded_vs_empty"] = (results["pages_loaded"]["overview_ms"]
                                                 / results["pages_empty"]["overview_ms"])
    results["ratio_overview_200_gateways_vs_empty"] = (results["pages_200_gateways"]["overview_ms"]
                                                       / results["pages_empty"]["overview_ms"])

    ing, pl, pe = results["ingest"], results["pages_loaded"], results["pages_empty"]
    rows = [
        ("ingest, batched (msgs/s)", f"{ing['batched_msgs_per_s']:,.0f}", f"{ing['messages']:,} msgs x 20 records"),
        ("ingest, batched (records/s)", f"{ing['batched_records_per_s']:,.0f}", ""),
        ("ingest, 1 msg per commit (msgs/s)", f"{ing['single_msgs_per_s']:,.0f}", f"{ing['single_messages']:,} msgs"),
        ("baseline: raw executemany (rows/s)", f"{ing['raw_rows_per_s']:,.0f}", "no decode/dedupe/summary"),
        ("ratio store records/s / raw rows/s", f"{ing['ratio_store_vs_raw_rows']:.2f}", ""),
        ("store size (MB)", f"{results['store_bytes'] / 1e6:,.0f}", f"{seconds} s x 50 turbines"),
        ("overview page, empty store (ms)", f"{pe['overview_ms']:.0f}", "baseline"),
        ("overview page, 50 turbines (ms)", f"{pl['overview_ms']:.0f}",
         f"x{results['ratio_overview_loaded_vs_empty']:.2f} of baseline"),
        ("turbine page, 7 charts, 2000 pts (ms)", f"{pl['turbine_ms']:.0f}", ""),
        ("GET /api/fleet (ms)", f"{pl['api_fleet_ms']:.1f}", f"empty: {pe['api_fleet_ms']:.1f}"),
        ("GET /api/turbines/x/scores?limit=2000 (ms)", f"{pl['api_scores_ms']:.1f}", ""),
        ("overview page, 200 gateways (ms)", f"{results['pages_200_gateways']['overview_ms']:.0f}",
         f"x{results['ratio_overview_200_gateways_vs_empty']:.2f} of baseline; 50 per page, lookups uncached"),
        ("GET /api/fleet?limit=50, 200 gateways (ms)", f"{results['pages_200_gateways']['api_fleet_page_ms']:.1f}",
         "incl. 200 per-device deployment lookups"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
