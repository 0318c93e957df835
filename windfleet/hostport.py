"""``host[:port]`` of a broker, parsed one way for every side (nucleus, fleet, ingest, dashboard)."""

from __future__ import annotations

DEFAULT_MQTT_PORT = 1883


def parse_hostport(value: str, default_port: int = DEFAULT_MQTT_PORT) -> tuple[str, int]:
    """``host:port`` -> (host, port); no ``:port`` -> ``default_port``; an empty host is
    127.0.0.1; ``[::1]:port`` loses its brackets.  ValueError for a port that is not a
    number (:func:`check_hostport` also checks ranges and the host)."""
    host, sep, port = value.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):  # a bare IPv6 address has no port
        return value, default_port
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


def check_hostport(value: str, *, lowest_port: int = 1, require_port: bool = False,
                   default_port: int = DEFAULT_MQTT_PORT) -> tuple[str, int]:
    """:func:`parse_hostport`, or ValueError with a one-line reason for a value no client
    could connect to (checked before anything starts).  ``lowest_port=0`` admits port 0,
    "start a broker on a free port"."""
    host, sep, port = value.rpartition(":")
    bad = (require_port and not sep) or (sep and not port.isdigit())
    if not bad:
        host, port_n = parse_hostport(value, default_port)
        bad = any(c.isspace() or c in "/@" for c in host) or not lowest_port <= port_n <= 65535
    if bad:
        form = "HOST:PORT" if require_port else "HOST[:PORT]"
        raise ValueError(f"expected {form} with a port from {lowest_port} to 65535, not {value!r}")
    return host, port_n
