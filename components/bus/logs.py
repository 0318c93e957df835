"""Component warnings and errors onto the bus, for the LogForwarder to take to the cloud.

:class:`BusLogHandler` is a ``logging.Handler`` that publishes each WARNING-or-worse
record of the process as ``payloads.log`` on ``topics.logs(thing)``.  It never raises
into the caller, never recurses (records of the bus and the SDK, and records emitted
while it publishes, are skipped), and sends at most ``per_minute`` records a minute
(the rest are counted in ``suppressed`` and reported with the next one sent), so a
flood of warnings cannot flood the cloud link.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from windfleet import payloads, topics

_SKIP = ("windfleet.bus", "awsiot", "awscrt")


class BusLogHandler(logging.Handler):
    """Publishes WARNING+ records of this process on ``topics.logs(bus.thing_name)``."""

    def __init__(self, bus: Any, level: int = logging.WARNING, per_minute: int = 60):
        super().__init__(level)
        self.bus, self.per_minute = bus, per_minute
        self.suppressed = 0
        self._window_start, self._sent_in_window = time.monotonic(), 0
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_SKIP) or getattr(self._busy, "on", False):
            return
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self._sent_in_window = now, 0
        if self._sent_in_window >= self.per_minute:
            self.suppressed += 1
            return
        self._sent_in_window += 1
        fields = dict(getattr(record, "fields", None) or {})
        if self.suppressed:
            fields["suppressed_before"], self.suppressed = self.suppressed, 0
        self._busy.on = True
        try:
            body = payloads.log(self.bus.thing_name, self.bus.component_name, record.levelname,
                                record.getMessage()[:2000], record.created, logger=record.name,
                                **{k: v for k, v in fields.items() if k not in ("thing", "component", "level")})
            self.bus.publish(topics.logs(self.bus.thing_name), body)
        except Exception:  # noqa: BLE001 - logging must never break the component
            pass
        finally:
            self._busy.on = False
