"""The AnomalyModel component's Install step: load and self-test a model package.

    python -m windfleet.components.detector.check_model {artifacts:path}

Exit 0 when the package passes every check the detector applies before it swaps
a model in (card, digests, ONNX contract, self-test); else print one line and
exit 1, so the nucleus marks the model component ERRORED, retries, and after
three failures BROKEN, which fails (and with ROLLBACK rolls back) the deployment.
"""

from __future__ import annotations

import sys

from windfleet.components.detector.model import ModelRejected, load_model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m windfleet.components.detector.check_model MODEL_DIR", file=sys.stderr)
        return 2
    try:
        model = load_model(args[0])
    except ModelRejected as exc:
        print(f"model rejected: {exc.reason}", flush=True)
        return 1
    print(f"model {model.version} ok ({args[0]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
