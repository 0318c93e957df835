"""Entry point of com.windfleet.LogForwarder (the recipe's Run step).

    python -m windfleet.components.forwarder.main --spool {work:path}/spool.sqlite

Builds the bus with :func:`windfleet.components.bus.connect` and calls
:func:`windfleet.components.forwarder.run` until SIGTERM/SIGINT, then flushes and
closes the spool.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from windfleet import jsonlog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="windfleet-forwarder", description=__doc__.splitlines()[0])
    p.add_argument("--spool", required=True, help="SQLite spool file (or directory), e.g. {work:path}/spool.sqlite")
    p.add_argument("--batch-records", type=int, default=100, help="records per telemetry message (max)")
    p.add_argument("--batch-bytes", type=int, default=96 * 1024, help="record bytes per telemetry message (max)")
    p.add_argument("--batch-interval", type=float, default=1.0, help="send a partial batch after this many seconds")
    p.add_argument("--max-records", type=int, default=100_000, help="spool bound in records (drop oldest beyond)")
    p.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="spool bound in bytes (drop oldest beyond)")
    p.add_argument("--min-free-bytes", type=int, default=None,
                   help="keep this much free on the spool's filesystem (default 2 MiB; drop oldest below)")
    p.add_argument("--health-interval", type=float, default=10.0, help="seconds between health messages")
    p.add_argument("--turbines", default=None, help="turbine count (default: configuration 'turbines')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from windfleet.components.bus import NotUnderNucleus, connect
    from windfleet.components.forwarder import COMPONENT, run

    log = jsonlog.setup(COMPONENT)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        bus = connect(COMPONENT)
    except NotUnderNucleus as exc:
        jsonlog.event(log, f"cannot start: {exc}", level=40)
        return 2
    run(bus, args.spool, stop_event=stop, max_records=args.max_records, max_bytes=args.max_bytes,
        min_free_bytes=args.min_free_bytes,
        batch_records=args.batch_records, batch_bytes=args.batch_bytes, batch_interval=args.batch_interval,
        health_interval=args.health_interval,
        **({"turbines": int(args.turbines)} if args.turbines is not None else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
