"""``host[:port]`` of a broker, parsed one way for every side (nucleus, fleet, ingest)."""

from __future__ import annotations

DEFAULT_MQTT_PORT = 1883


def parse_hostport(value: str, default_port: int = DEFAULT_MQTT_PORT) -> tuple[str, int]:
    """``host:port`` -> (host, port); no ``:port`` -> ``default_port``; an empty host is
    127.0.0.1.  ValueError for a port that is not a number (callers validate ranges)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    return host or "127.0.0.1", int(port)
