"""Entry point of com.windfleet.TurbineSimulator (the recipe's Run step).

    python -m windfleet.components.simulator.main [--turbines N] [--rate HZ] [--batch N]
        [--seed S] [--duration SECONDS] [--realtime true|false | --max-rate] [--drift JSON]

Arguments override the component configuration (see ``service`` for every key).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from windfleet import jsonlog
from windfleet.components.bus import connect
from windfleet.components.simulator.service import COMPONENT, run


def _json_list(text: str) -> list:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("a JSON list of drift scenarios")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbine-simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--turbines", type=int, help="number of turbines (default: configuration, else 1)")
    parser.add_argument("--rate", type=float, help="samples per second per turbine (default 20)")
    parser.add_argument("--batch", type=int, help="samples per readings message (default 20)")
    parser.add_argument("--readings-version", type=int, choices=(1, 2),
                        help="2: columnar batches (default); 1: one object per sample, as older devices")
    parser.add_argument("--seed", type=int, help="base seed (with the thing name)")
    parser.add_argument("--anomalies-per-hour", type=float, help="random anomalies per turbine per hour")
    parser.add_argument("--duration", type=float, dest="duration_s", help="simulated seconds, then exit")
    parser.add_argument("--realtime", choices=("true", "false"), help="pace to the wall clock (default true)")
    parser.add_argument("--max-rate", action="store_true", help="as fast as possible (= --realtime false)")
    parser.add_argument("--start-ts", type=float, dest="start_ts", help="epoch seconds of sample 0")
    parser.add_argument("--drift", type=_json_list, help='drift scenarios as JSON, e.g. \'[{"kind": "sensor_offset", '
                        '"turbines": [0], "channel": "voltage", "offset": 60, "start_s": 30, "ramp_s": 10}]\'')
    args = parser.parse_args(argv)
    jsonlog.setup(COMPONENT)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    realtime = False if args.max_rate else (None if args.realtime is None else args.realtime == "true")
    bus = connect(COMPONENT)
    return run(bus, stop, turbines=args.turbines, rate=args.rate, batch=args.batch, seed=args.seed,
               anomalies_per_hour=args.anomalies_per_hour, duration_s=args.duration_s, realtime=realtime,
               start_ts=args.start_ts, readings_version=args.readings_version, drift=args.drift)


if __name__ == "__main__":
    sys.exit(main())
