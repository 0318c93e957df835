"""The token exchange service of the local nucleus (``aws.greengrass.TokenExchangeService``).

On a device the nucleus serves AWS credentials on loopback: a component that depends on
``aws.greengrass.TokenExchangeService`` gets ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` (this
server) and ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (its SVCUID), and any AWS SDK's default
credential chain fetches credentials from there (developer guide, "Interact with AWS
services").  The HTTP contract copied here: ``GET`` on the full URI with the token in the
``Authorization`` header answers ``{"AccessKeyId", "SecretAccessKey", "Token",
"Expiration"}`` (ISO 8601); an unknown token is 403, a missing one 400.

Where the real service trades the device certificate for temporary credentials at the
IoT credentials provider, this one mints them with :class:`CredentialAuthority`: a random
access key id and session token (which carries its expiry), and a secret derived from
them with HMAC under a key kept in the local cloud's home (``$WINDFLEET_HOME/tes/signing.key``).
The local S3 endpoint (``cloud/local/s3_server.py``) derives the same secret to check a
request's signature, so only credentials this service issued are accepted there, and
neither side keeps a table of issued credentials (both survive restarts).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from windfleet import jsonlog
from windfleet.loopback import LoopbackServer

log = logging.getLogger("windfleet.nucleus.tes")

COMPONENT = "aws.greengrass.TokenExchangeService"
PATH = "/2016-11-01/credentialprovider/"  # the real service's path
DEFAULT_TTL = 3600.0   # seconds: the IoT credentials provider's default duration
REFRESH_BEFORE = 300.0  # hand out a new set when the cached one has less than this left


def default_home() -> Path:
    """``$WINDFLEET_HOME`` or ``~/.windfleet`` (the local cloud store's home)."""
    return Path(os.environ.get("WINDFLEET_HOME") or Path.home() / ".windfleet")


class CredentialAuthority:
    """Mints and checks the local credentials.  ``home``: the local cloud's home directory."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.key_path = Path(home or default_home()) / "tes" / "signing.key"
        self._loaded: bytes | None = None

    @property
    def _key(self) -> bytes:
        """Read (or made) at the first use: a nucleus whose components never ask writes nothing."""
        if self._loaded is None:
            self._loaded = self._load_key()
        return self._loaded

    def _load_key(self) -> bytes:
        try:
            return self.key_path.read_bytes()
        except FileNotFoundError:
            pass
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.key_path.with_name(f".{self.key_path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:  # first writer wins: two processes starting at once share one key
            os.link(tmp, self.key_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self.key_path.read_bytes()

    def _secret(self, access_key: str, token: str) -> str:
        digest = hmac.new(self._key, f"{access_key}\n{token}".encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()[:40]

    def issue(self, ttl: float = DEFAULT_TTL, now: float | None = None) -> dict:
        """A new credential set in the token exchange service's JSON shape."""
        expires = int((time.time() if now is None else now) + ttl)
        access_key = "ASIA" + base64.b32encode(secrets.token_bytes(10)).decode()
        token = f"wf1.{expires}.{secrets.token_urlsafe(24)}"
        return {"AccessKeyId": access_key, "SecretAccessKey": self._secret(access_key, token), "Token": token,
                "Expiration": datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def secret_for(self, access_key: str, token: str | None, now: float | None = None) -> str | None:
        """The secret of credentials this authority issued and that have not expired, else None."""
        if not token or not access_key.startswith("ASIA"):
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "wf1" or not parts[1].isdigit():
            return None
        if int(parts[1]) <= (time.time() if now is None else now):
            return None
        return self._secret(access_key, token)


class TokenExchangeServer(LoopbackServer):
    """The loopback HTTP server.  ``principal_of(token)``: the component a token belongs to
    (None: refused); ``authorized(component)``: its ``getCredentials`` permission."""

    thread_name = "tes"

    def __init__(self, authority: CredentialAuthority, principal_of: Callable[[str], str | None],
                 authorized: Callable[[str], bool] = lambda _: True, *, host: str = "127.0.0.1", port: int = 0,
                 ttl: float = DEFAULT_TTL):
        self.authority, self.principal_of, self.authorized, self.ttl = authority, principal_of, authorized, ttl
        self.requests = 0
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests += 1
                status, body = server.answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args) -> None:  # requests are counted, not printed
                pass

        super().__init__(Handler, host, port)

    @property
    def uri(self) -> str:
        """``AWS_CONTAINER_CREDENTIALS_FULL_URI``."""
        host, port = self.address
        return f"http://{host}:{port}{PATH}"

    def answer(self, path: str, token: str | None) -> tuple[int, dict]:
        """(HTTP status, JSON body) for a GET on ``path`` with ``Authorization: token``."""
        if path.split("?")[0] != PATH:
            return 404, {"message": "Not found"}
        if not token:
            return 400, {"message": "Authorization header is required"}
        component = self.principal_of(token)
        if component is None or not self.authorized(component):
            jsonlog.event(log, "credentials refused", logging.WARNING, component=component)
            return 403, {"message": "Unauthorized"}
        with self._lock:  # one set until it nears expiry, as the real service caches the provider's
            now = time.time()
            if self._cached is None or self._cached[0] - now < min(REFRESH_BEFORE, self.ttl / 2):
                self._cached = (now + self.ttl, self.authority.issue(self.ttl, now))
            return 200, dict(self._cached[1])
