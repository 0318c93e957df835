"""Entry point of com.windfleet.AnomalyDetector (the recipe's Run step).

    python -m windfleet.components.detector.main \
        --models-root {kernel:rootPath}/packages/artifacts/com.windfleet.AnomalyModel --work-dir {work:path}

Everything else comes from the component configuration (see ``service.run``).
SIGTERM (the nucleus stopping or restarting the component) saves the windows
in progress to the work dir; the next start resumes them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from windfleet import jsonlog
from windfleet.components.bus import connect
from windfleet.components.detector.service import COMPONENT, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-detector", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="model package (model.onnx + model.json); default: configuration model_dir")
    parser.add_argument("--models-root", help="the model component's versions ({kernel:rootPath}/packages/artifacts/"
                                              "com.windfleet.AnomalyModel); the detector follows its configuration")
    parser.add_argument("--work-dir", default=".", help="kept across restarts: last good model, saved windows")
    parser.add_argument("--turbines", help="count or comma-separated ids; default: configuration turbines")
    parser.add_argument("--max-batch", type=int, help="windows per onnxruntime call (default 128)")
    parser.add_argument("--queue-size", type=int, help="windows queued before back-pressure/drops (default 1024)")
    parser.add_argument("--health-interval", type=float, help="seconds between health messages (default 10)")
    args = parser.parse_args(argv)
    jsonlog.setup(COMPONENT)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    turbines = None
    if args.turbines:
        turbines = int(args.turbines) if args.turbines.isdigit() else args.turbines.split(",")
    bus = connect(COMPONENT)
    return run(bus, args.model_dir, args.work_dir, stop, turbines=turbines, models_root=args.models_root, max_batch=args.max_batch,
               queue_size=args.queue_size, health_interval=args.health_interval)


if __name__ == "__main__":
    sys.exit(main())
