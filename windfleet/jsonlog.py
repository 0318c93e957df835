"""Structured logs: one JSON object per line on stdout.

Greengrass writes each component's stdout to ``logs/<Component>.log``, which is
where its users look; the local runtime does the same.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(component: str, level: int = logging.INFO, stream=None) -> logging.Logger:
    """Route the root logger to JSON lines on ``stream`` (stdout by default)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(component)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` merged into the JSON line."""
    logger.log(level, msg, extra={"fields": fields})


class RateLimited:
    """Log each kind of problem at most once per ``interval`` seconds, with a count.

    Malformed input is counted per kind and logged like this so a flood of bad
    messages can neither fill the disk nor hide the first occurrence.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0):
        self.logger, self.interval = logger, interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, msg: str, **fields: Any) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        event(self.logger, msg, logging.WARNING, kind=kind, suppressed_since_last=suppressed, **fields)
        return True
