"""A small threaded HTTP server on loopback: the base of the local S3 endpoint
(``cloud/local/s3_server.py``) and the local token exchange service (``nucleus/tes.py``).

One place for the start/stop life of a ``ThreadingHTTPServer``: daemon request threads,
a daemon serving thread, ``close`` that stops serving and releases the port whether or not
it ever served."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """Serves ``handler`` (a ``BaseHTTPRequestHandler`` class) on ``host:port`` (0: a free port)."""

    thread_name = "http"

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0):
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True  # a stuck client never holds the process open
        self._serving = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self):
        """Serve on a daemon thread; returns self."""
        self._serving = True
        threading.Thread(target=self._httpd.serve_forever, name=self.thread_name, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`close` (from another) or an interrupt."""
        self._serving = True
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and release the port (requests in progress finish)."""
        if self._serving:
            self._httpd.shutdown()
            self._serving = False
        self._httpd.server_close()
