"""The operator dashboard: a Starlette app over the telemetry store, the model
registry and the deployment service.

    app = create_app(TelemetryStore(path), registry=Registry(backend),
                     greengrass=backend.greengrassv2, token="s3cret")

Pages (``/``, ``/turbines/{id}``, ``/anomalies``, ``/registry``, ``/canary``, ``/drift``) are static
HTML + ``app.js`` that poll the JSON API below; charts are uPlot, served from
``/static/vendor`` (no CDN).

JSON API::

    GET  /api/fleet                       gateways (state, errors, turbines, components, loss, deployment
                                          per device) + summary (counts by state, open anomalies, the
                                          deployment in progress); ?state=&q=&offset=&limit= for one page
    GET  /api/turbines/{id}/scores        ?since=<epoch s>&limit=<1..20000>
    GET  /api/anomalies                   ?since=&limit=&thing=
    GET  /api/drift                       per model version its turbines drifted now and retrain_suggested
                                          (models), each turbine's newest drift record (turbines), flagged ids
    GET  /api/turbines/{id}/drift         ?since=&limit=: per feature drift score and threshold over time
    GET  /api/registry                    one row per model version (models.model_row, with its ``drift``)
                                          + what the fleet runs
    GET  /api/registry/{version}/compare  that version beside the fleet's model: metric deltas, thresholds
    GET  /api/deployments                 latest deployment per target + per-device outcome
    POST /api/registry/{version}/approve  Authorization: Bearer <token>; JSON {"reason": "..."}
    POST /api/registry/{version}/reject   Authorization: Bearer <token>; JSON {"reason": "..."}
    GET  /api/canary                      the current or last canary: cloud.canary.status (gates, verdict,
                                          per-device figures) + series (pooled alarm rates, agreement)
    POST /api/canary/promote              Authorization: Bearer <token>; JSON {"reason": "..."}
    POST /api/canary/abort                Authorization: Bearer <token>; JSON {"reason": "..."}

Decisions need a reason (1-500 characters) and apply to versions pending approval
only (409 otherwise).  The actor recorded with them is the name of the token used
(``create_app(tokens={"alice": "<token>", ...})``; a single ``token`` is named
``token_name``), never a name the request claims.

    GET  /login                           a form; POST /login (form field ``token``) sets the
                                          session cookie; POST /logout clears it

Access (README "Dashboard access"):

* *local* = the client address is loopback AND the Host header is ``localhost``,
  ``127.0.0.1`` or ``[::1]`` with the port this server listens on.  A local request
  may read without a token; every other request needs the token: ``Authorization:
  Bearer <token>``, or the ``windfleet_session`` cookie (HttpOnly, SameSite=Strict,
  an HMAC of the token, never the token itself) set by POSTing the token to /login.
* A loopback client naming any other Host without a valid token is a DNS-rebinding
  signature: 403 for everything but /login and /static.
* approve/reject and canary promote/abort always need ``Authorization: Bearer <token>``; the cookie does not
  authorise them, and neither does being local.
* The token never travels in a URL: ``/login?token=`` is answered 400.  Tokens are
  compared in constant time; request bodies are capped before they are read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html import escape
from urllib.parse import parse_qs
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from windfleet.cloud.ingest import THING_RE, TURBINE_RE, TelemetryStore

from . import fleetview, models

STATIC = Path(__file__).parent / "static"
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
MAX_LIMIT = 20_000
MAX_REASON = 500
MAX_PAGE = 500  # gateways per /api/fleet page
CACHE_S = 3.0  # per-device deployment lookups and the fleet's model, shared by every poll this long
LOOKUP_THREADS = 8  # concurrent per-device deployment lookups (boto3 clients are thread-safe)
MAX_BODY = 4096  # approve/reject and /login bodies; refused (413) before they are read past this
COOKIE = "windfleet_session"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
PUBLIC_PATHS = frozenset({"/login", "/logout", "/favicon.ico"})  # + /static/: nothing secret there

PAGES = {
    "overview": "Fleet overview",
    "turbine": "Turbine",
    "anomalies": "Anomaly timeline",
    "registry": "Model registry & deployments",
    "canary": "Canary",
    "drift": "Input drift",
}


class BadRequest(ValueError):
    """A request parameter that fails validation (answered 400 with the reason)."""


def jsonable(value: Any) -> Any:
    """boto3-shaped responses carry datetimes and bytes; make them JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if k != "ResponseMetadata"}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "__dict__"):
        return jsonable({k: v for k, v in vars(value).items() if not k.startswith("_")})
    return str(value)


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(jsonable(data), status_code=status)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def client_is_loopback(address: str | None) -> bool:
    """The peer address is a loopback address (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False  # a unix socket, or no peer at all: not loopback
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def host_is_loopback(host_header: str | None, port: int | None) -> bool:
    """The Host header is a loopback *name* (localhost, 127.0.0.1, [::1]) with the
    port this server listens on (no port = 80).  Anything else -- a DNS name that
    resolves to 127.0.0.1 included -- is not."""
    if not host_header or port is None:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name += "]"
        if rest and not rest.startswith(":"):
            return False
        port_text = rest[1:]
    else:
        name, sep, port_text = host.rpartition(":")
        if not sep:
            name, port_text = host, ""
    if port_text == "":
        host_port = 80
    elif port_text.isdigit() and len(port_text) <= 5:
        host_port = int(port_text)
    else:
        return False
    return name in LOOPBACK_NAMES and host_port == port


def _served_port(scope: dict) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


class BodyTooLarge(Exception):
    """A request body over its cap (answered 413 without reading the rest)."""


async def read_capped(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, refusing one over ``limit`` bytes as soon as that is known: from
    Content-Length before reading anything, else while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def _query_float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be finite")
    return value


def _query_limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer in 1..{MAX_LIMIT}")
    return int(raw)


# ---------------------------------------------------------------- registry / deployments adapters
def registry_entries(registry: Any) -> list[dict]:
    """Normalise ``Registry.list()`` to ``[{version, status, created, metrics, ...}]``
    whatever its exact shape (dicts with our keys or SageMaker's, or objects)."""
    out = []
    for item in registry.list() or []:
        item = jsonable(item)
        if not isinstance(item, dict):
            item = {"version": str(item)}
        version = next((item[k] for k in ("version", "ModelPackageVersion", "model_version") if k in item), None)
        status = next((item[k] for k in ("status", "approval", "ModelApprovalStatus") if k in item), None)
        metrics = next((item[k] for k in ("metrics", "ModelMetrics") if k in item), None)
        created = next((item[k] for k in ("created", "created_at", "CreationTime") if k in item), None)
        out.append({**item, "version": None if version is None else str(version), "status": status,
                    "metrics": metrics, "created": created})
    return out


def _latest(items: list[dict], *keys: str) -> dict | None:
    def key(item: dict) -> str:
        return max((str(item.get(k) or "") for k in keys), default="")
    return max(items, key=key) if items else None


def session_of(token: str) -> str:
    """The session cookie's value for ``token``: derived from it, so a stolen cookie is not the token."""
    return hmac.new(token.encode(), b"windfleet-dashboard-session", hashlib.sha256).hexdigest()


class Dashboard:
    """The request handlers; ``create_app`` wires them into Starlette."""

    def __init__(self, store: TelemetryStore, registry: Any = None, greengrass: Any = None,
                 token: str | None = None, poll_ms: int = 2000, *, token_name: str = "dashboard",
                 tokens: dict[str, str] | None = None,
                 offline_after_s: float = fleetview.DEFAULT_OFFLINE_AFTER_S):
        self.store, self.registry, self.greengrass = store, registry, greengrass
        self.poll_ms, self.offline_after_s = poll_ms, offline_after_s
        # token -> the actor name recorded with the decisions it authorises
        self.actors: dict[str, str] = {t: name for name, t in (tokens or {}).items()}
        if token or not self.actors:
            self.token = token or secrets.token_urlsafe(24)
            self.actors[self.token] = token_name
        else:
            self.token = next(iter(self.actors))
        self.sessions = {session_of(t): name for t, name in self.actors.items()}
        self._cache: dict[str, tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()

    def cached(self, key: str, compute: Callable[[], Any], ttl: float = CACHE_S) -> Any:
        """``compute()``, shared by the requests of the next ``ttl`` seconds (polls of many pages)."""
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < ttl:
                return hit[1]
        value = compute()
        with self._cache_lock:
            self._cache[key] = (time.monotonic(), value)
        return value

    def forget(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # ------------------------------------------------------------ auth
    @staticmethod
    def _match(candidate: str | None, table: dict[str, str]) -> str | None:
        """The name of the entry equal to ``candidate``; every entry is compared in constant time."""
        found = None
        if candidate:
            for secret, name in table.items():
                if hmac.compare_digest(candidate.encode(), secret.encode()):
                    found = name
        return found

    def _token_ok(self, candidate: str | None) -> bool:
        return self._match(candidate, self.actors) is not None

    def _session_ok(self, candidate: str | None) -> bool:
        return self._match(candidate, self.sessions) is not None

    @staticmethod
    def _bearer(headers: Any) -> str | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def credentials_ok(self, request: Request) -> bool:
        """A valid bearer token or session cookie (what reads from anywhere accept)."""
        return self._token_ok(self._bearer(request.headers)) or self._session_ok(request.cookies.get(COOKIE))

    @staticmethod
    def is_local(request: Request) -> bool:
        return (client_is_loopback(request.client.host if request.client else None)
                and host_is_loopback(request.headers.get("host"), _served_port(request.scope)))

    def read_allowed(self, request: Request) -> bool:
        return self.is_local(request) or self.credentials_ok(request)

    def actor(self, request: Request) -> str | None:
        """Who is deciding: the name of the bearer token, None without a valid one.  The header
        only: never the cookie, never "local"."""
        return self._match(self._bearer(request.headers), self.actors)

    # ------------------------------------------------------------ pages
    def _page(self, name: str, params: dict[str, str]) -> HTMLResponse:
        html = (STATIC / "page.html").read_text()
        config = {"page": name, "poll_ms": self.poll_ms, **params}
        html = html.replace("{{title}}", PAGES[name]).replace(
            "{{config}}", json.dumps(config).replace("<", "\\u003c").replace('"', "&quot;"))
        return HTMLResponse(html)

    async def overview(self, request: Request) -> Response:
        return self._page("overview", {})

    async def turbine_page(self, request: Request) -> Response:
        turbine = request.path_params["turbine_id"]
        if not TURBINE_RE.match(turbine):
            return HTMLResponse("bad turbine id", status_code=400)
        return self._page("turbine", {"turbine_id": turbine})

    async def anomalies_page(self, request: Request) -> Response:
        return self._page("anomalies", {})

    async def registry_page(self, request: Request) -> Response:
        return self._page("registry", {})

    async def canary_page(self, request: Request) -> Response:
        return self._page("canary", {})

    async def drift_page(self, request: Request) -> Response:
        turbine = request.query_params.get("turbine") or ""
        if turbine and not TURBINE_RE.match(turbine):
            return HTMLResponse("bad turbine id", status_code=400)
        return self._page("drift", {"turbine_id": turbine} if turbine else {})

    async def login(self, request: Request) -> Response:
        if "token" in request.query_params:
            return login_page(400, "The token never goes in a URL; type it into this form.")
        if request.method == "GET":
            return login_page(200)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return login_page(415, "Send the form (application/x-www-form-urlencoded).")
        try:
            body = await read_capped(request)
        except BodyTooLarge:
            return login_page(413, "Request too large.")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        if not self._token_ok(token):
            return login_page(401, "Wrong token.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session_of(token), httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------ API: reads
    def deployments_by_device(self, things: list[str]) -> dict[str, Any]:
        """Each device's latest effective deployment.  One call per device (the service has no
        bulk read), made :data:`LOOKUP_THREADS` at a time: on AWS each is a round trip."""
        if self.greengrass is None:
            return {}

        def one(thing: str) -> Any:
            try:
                resp = self.greengrass.list_effective_deployments(coreDeviceThingName=thing)
                return jsonable(_latest(resp.get("effectiveDeployments", []), "modifiedTimestamp", "creationTimestamp"))
            except Exception as exc:  # noqa: BLE001 - a device the service does not know yet
                return {"error": f"{type(exc).__name__}: {exc}"[:200]}

        if len(things) < 2:
            return {thing: one(thing) for thing in things}
        with ThreadPoolExecutor(max_workers=min(LOOKUP_THREADS, len(things))) as pool:
            return dict(zip(things, pool.map(one, things)))

    def fleet_view(self) -> dict:
        """The annotated fleet (every gateway), per-device deployments cached for :data:`CACHE_S`."""
        fleet = self.store.fleet()
        things = [g["thing"] for g in fleet["gateways"]]
        per_device = self.cached("deployments:" + ",".join(things), lambda: self.deployments_by_device(things))
        fleet = fleetview.annotate(fleet, per_device, self.offline_after_s)
        fleet["deployments_available"] = self.greengrass is not None
        return fleet

    async def api_fleet(self, request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in fleetview.STATES:
            raise BadRequest(f"state must be one of {', '.join(fleetview.STATES)}")
        query = q.get("q") or None
        if query is not None and len(query) > 128:
            raise BadRequest("q is at most 128 characters")
        offset = q.get("offset", "0")
        limit = q.get("limit")
        if not offset.isdigit() or (limit is not None and (not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE)):
            raise BadRequest(f"offset must be an integer >= 0 and limit one in 1..{MAX_PAGE}")
        # store and deployment-service reads block: off the event loop, so other requests go on
        fleet = fleetview.page(await run_in_threadpool(self.fleet_view), state, query, int(offset),
                               int(limit) if limit else None)
        return _json(fleet)

    async def api_scores(self, request: Request) -> Response:
        turbine = request.path_params["turbine_id"]
        if not TURBINE_RE.match(turbine):
            return _error(400, "turbine id must look like <thing>-tNN")
        data = self.store.turbine_scores(turbine, _query_float(request, "since"), _query_limit(request, 2000))
        if not data["known"]:
            return _error(404, f"no scores for turbine {turbine}")
        return _json(data)

    async def api_anomalies(self, request: Request) -> Response:
        thing = request.query_params.get("thing") or None
        if thing is not None and not THING_RE.match(thing):
            return _error(400, "bad thing name")
        items = self.store.anomalies(_query_float(request, "since"), _query_limit(request, 200), thing)
        return _json({"anomalies": items, "logs": self.store.logs(limit=50)})

    def drift_view(self) -> dict:
        """Drift now: per model version (``retrain_suggested`` when any turbine running it is
        drifted in its newest record), per turbine its newest record, the flagged turbine ids."""
        by_model = self.store.drift_by_model()
        return {"models": sorted(by_model.values(), key=lambda m: (not m["retrain_suggested"], m["model_version"])),
                "turbines": self.store.latest_drift(),
                "flagged": self.store.drift_flagged_turbines()}

    async def api_drift(self, request: Request) -> Response:
        return _json(await run_in_threadpool(self.drift_view))

    async def api_turbine_drift(self, request: Request) -> Response:
        turbine = request.path_params["turbine_id"]
        if not TURBINE_RE.match(turbine):
            return _error(400, "turbine id must look like <thing>-tNN")
        data = self.store.drift_series(turbine, _query_float(request, "since"), _query_limit(request, 2000))
        if not data["known"]:
            return _error(404, f"no drift records for turbine {turbine}")
        return _json(data)

    def _entries(self) -> list[dict]:
        return registry_entries(self.registry)

    def fleet_model(self, entries: list[dict]) -> dict:
        return self.cached("fleet-model", lambda: models.fleet_model(self.registry, self.greengrass, self.store,
                                                                     entries))

    async def api_registry(self, request: Request) -> Response:
        if self.registry is None:
            return _json({"available": False, "versions": []})
        return _json(await run_in_threadpool(self.registry_view))

    def registry_view(self) -> dict:
        try:
            entries = self._entries()
            rows = models.registry_rows(self.registry, entries)
        except Exception as exc:  # noqa: BLE001 - show it, do not 500 the page
            return {"available": True, "versions": [], "error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            fleet = self.fleet_model(entries)
        except Exception as exc:  # noqa: BLE001 - the versions still show
            fleet = {"source": None, "detail": f"cannot tell what the fleet runs: {type(exc).__name__}: {exc}"[:300]}
        running = (fleet.get("row") or {}).get("version")
        drift = self.store.drift_by_model()
        for row in rows:
            row["running"] = running is not None and row["version"] == running
            row["drift"] = drift.get(row.get("model_version") or "")
        return {"available": True, "versions": rows,
                "fleet": {k: v for k, v in fleet.items() if k != "row"} | {"version": running}}

    async def api_compare(self, request: Request) -> Response:
        version = request.path_params["version"]
        if not VERSION_RE.match(version):
            return _error(400, "bad version")
        if self.registry is None:
            return _error(503, "no model registry configured")
        view = await run_in_threadpool(self.compare_view, version)
        return _error(404, f"unknown version {version}") if view is None else _json(view)

    def compare_view(self, version: str) -> dict | None:
        entries = self._entries()
        entry = next((e for e in entries if e["version"] == version), None)
        if entry is None:
            return None
        candidate = models.registry_rows(self.registry, [entry])[0]
        fleet = self.fleet_model(entries)
        return {"candidate": candidate, "deployed": fleet.get("row"),
                "fleet": {k: v for k, v in fleet.items() if k != "row"},
                **models.compare(candidate, fleet.get("row")),
                "canary": models.canary_view(self.registry, self.store, version)}

    async def api_deployments(self, request: Request) -> Response:
        if self.greengrass is None:
            return _json({"available": False, "deployments": [], "devices": {}})
        history = "ALL" if request.query_params.get("history") == "all" else "LATEST_ONLY"
        try:
            resp = self.greengrass.list_deployments(historyFilter=history)
            deployments = resp.get("deployments", [])
        except Exception as exc:  # noqa: BLE001
            return _json({"available": True, "deployments": [], "devices": {},
                          "error": f"{type(exc).__name__}: {exc}"[:300]})
        deployments = sorted(deployments, key=lambda d: str(d.get("creationTimestamp") or ""), reverse=True)
        return _json({"available": True, "deployments": deployments,
                      "devices": self.deployments_by_device(self.store.things())})

    # ------------------------------------------------------------ API: writes
    @staticmethod
    async def _reason(request: Request, action: str) -> str | Response:
        """The request body's one-line ``reason`` (required), or the error response."""
        try:
            body = await read_capped(request)
        except BodyTooLarge:
            return _error(413, f"body too large (at most {MAX_BODY} bytes)")
        try:
            reason = json.loads(body or b"{}").get("reason", "")
        except (ValueError, AttributeError):
            return _error(400, 'body must be a JSON object: {"reason": "..."}')
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            return _error(400, f"reason must be a string of at most {MAX_REASON} characters")
        reason = " ".join(reason.split())  # one line: it is shown in tables and stored as metadata
        if not reason:
            return _error(400, f"a reason is required to {action} (it is recorded with your name and the time)")
        return reason

    async def api_canary(self, request: Request) -> Response:
        if self.registry is None or getattr(self.registry, "backend", None) is None:
            return _error(503, "no model registry configured")
        try:
            view = await run_in_threadpool(models.canary_page, self.registry, self.store)
        except Exception as exc:  # noqa: BLE001 - the page says why
            return _error(409, f"{type(exc).__name__}: {exc}"[:300])
        return _json(view)

    async def api_canary_act(self, request: Request) -> Response:
        """Promote or abort the running canary by hand: the token's name and the reason are
        recorded in the canary's state (and, for an abort, in the package's approval metadata)."""
        actor = self.actor(request)
        action = request.path_params["action"]
        if actor is None:
            return _error(401, f"{action} needs the dashboard token as 'Authorization: Bearer <token>'")
        if self.registry is None or getattr(self.registry, "backend", None) is None:
            return _error(503, "no model registry configured")
        reason = await self._reason(request, action)
        if isinstance(reason, Response):
            return reason
        from windfleet.cloud import canary

        act = canary.promote if action == "promote" else canary.abort
        try:
            result = await run_in_threadpool(lambda: act(self.registry.backend, reason, actor,
                                                         group=getattr(self.registry, "group", None)))
        except canary.CanaryError as exc:
            return _error(409, str(exc)[:300])
        except Exception as exc:  # noqa: BLE001
            return _error(409, f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self.forget()
        return _json({"action": action, "actor": actor, "reason": reason, "result": result})

    async def api_decide(self, request: Request) -> Response:
        actor = self.actor(request)
        if actor is None:
            return _error(401, "approve/reject need the dashboard token as 'Authorization: Bearer <token>'")
        version, action = request.path_params["version"], request.path_params["action"]
        if not VERSION_RE.match(version):
            return _error(400, "bad version")
        if self.registry is None:
            return _error(503, "no model registry configured")
        reason = await self._reason(request, action)
        if isinstance(reason, Response):
            return reason
        try:
            entry = next((e for e in await run_in_threadpool(self._entries) if e["version"] == version), None)
        except Exception as exc:  # noqa: BLE001
            return _error(409, f"{type(exc).__name__}: {exc}"[:300])
        if entry is not None and entry["status"] != "PendingManualApproval":
            return _error(409, f"version {version} is {entry['status']}: only a version pending approval can be "
                          "approved or rejected")
        try:
            decide = self.registry.approve if action == "approve" else self.registry.reject
            result = await run_in_threadpool(decide, version, reason, actor=actor)
        except (KeyError, LookupError) as exc:
            return _error(404, f"unknown version {version}: {exc}")
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "RegistryError" and str(exc).startswith("no model package version"):
                return _error(404, str(exc)[:300])  # the CLOUD registry's "unknown version"
            return _error(409, f"{type(exc).__name__}: {exc}"[:300])  # the registry's own one-line reason
        finally:
            self.forget()  # the fleet's model and deployments change now
        return _json({"version": version, "action": action, "actor": actor, "reason": reason, "result": result})


LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>windfleet \u00b7 sign in</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body><main id="main"><h1>windfleet dashboard</h1>
<p id="login-message" class="{cls}">{message}</p>
<form id="login" method="post" action="/login">
<label for="token">Dashboard token</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit">Sign in</button></form>
<p class="muted">The token is printed when the dashboard starts. It is sent in this form's body, never in a URL;
the page then keeps an HttpOnly, SameSite=Strict session cookie.</p></main></body></html>
"""


def login_page(status: int, message: str = "") -> HTMLResponse:
    text = message or "This client is not local: sign in with the dashboard token."
    return HTMLResponse(LOGIN_HTML.format(message=escape(text), cls="err" if message else "muted"),
                        status_code=status)


def _refused(path: str, status: int, message: str) -> Response:
    if path.startswith("/api/"):
        return _error(status, message)
    return login_page(status, message)


class AccessGuard:
    """Pure ASGI middleware: a loopback client naming a Host that is not a loopback
    name, without a valid token or session, is a DNS-rebinding signature -> 403 for
    every path but the login form and static files."""

    def __init__(self, app: Any, dashboard: "Dashboard"):
        self.app, self.dash = app, dashboard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path not in PUBLIC_PATHS and not path.startswith("/static/"):
                request = Request(scope)
                if (client_is_loopback(request.client.host if request.client else None)
                        and not host_is_loopback(request.headers.get("host"), _served_port(scope))
                        and not self.dash.credentials_ok(request)):
                    response = _refused(path, 403, "Host not allowed: from this machine use localhost, "
                                        "127.0.0.1 or [::1] with the dashboard's port, or send the token")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
       " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class SecurityHeaders:
    """Pure ASGI middleware adding CSP (scripts only from this origin), nosniff and
    no-store for the API."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_api = scope["path"].startswith("/api/")

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store" if is_api else b"no-cache"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(store: TelemetryStore, registry: Any = None, greengrass: Any = None,
               token: str | None = None, *, poll_ms: int = 2000, token_name: str = "dashboard",
               tokens: dict[str, str] | None = None,
               offline_after_s: float = fleetview.DEFAULT_OFFLINE_AFTER_S) -> Starlette:
    """Build the dashboard app.  ``registry`` has ``list()``, ``approve(v, reason, actor=)``,
    ``reject(v, reason, actor=)`` and optionally ``card(entry)``/``evaluation(entry)``/
    ``artifact_size(entry)`` (:class:`windfleet.cloud.registry.Registry`); ``greengrass`` is a
    boto3-shaped greengrassv2 client.  Either may be None (the pages say so).
    ``tokens`` maps actor names to tokens; ``token`` (generated when neither is given) is
    named ``token_name``.  ``app.state.token`` holds the first token."""
    dash = Dashboard(store, registry, greengrass, token, poll_ms, token_name=token_name, tokens=tokens,
                     offline_after_s=offline_after_s)

    def guarded(handler: Callable) -> Callable:
        async def wrapper(request: Request) -> Response:
            if not dash.read_allowed(request):
                return _refused(request.url.path, 401, "token required: this request is not local "
                                "(loopback client and a localhost/127.0.0.1/[::1] Host)")
            try:
                return await handler(request)
            except BadRequest as exc:
                return _error(400, str(exc))
        return wrapper

    async def decide(request: Request) -> Response:
        if request.path_params["action"] not in ("approve", "reject"):
            return _error(404, "unknown action (approve or reject)")
        return await dash.api_decide(request)

    async def canary_act(request: Request) -> Response:
        if request.path_params["action"] not in ("promote", "abort"):
            return _error(404, "unknown action (promote or abort)")
        return await dash.api_canary_act(request)

    routes = [
        Route("/", guarded(dash.overview)),
        Route("/canary", guarded(dash.canary_page)),
        Route("/api/canary", guarded(dash.api_canary)),
        Route("/api/canary/{action:str}", canary_act, methods=["POST"]),
        Route("/turbines/{turbine_id}", guarded(dash.turbine_page)),
        Route("/anomalies", guarded(dash.anomalies_page)),
        Route("/registry", guarded(dash.registry_page)),
        Route("/login", dash.login, methods=["GET", "POST"]),
        Route("/logout", dash.logout, methods=["POST"]),
        Route("/api/fleet", guarded(dash.api_fleet)),
        Route("/api/turbines/{turbine_id}/scores", guarded(dash.api_scores)),
        Route("/api/anomalies", guarded(dash.api_anomalies)),
        Route("/drift", guarded(dash.drift_page)),
        Route("/api/drift", guarded(dash.api_drift)),
        Route("/api/turbines/{turbine_id}/drift", guarded(dash.api_turbine_drift)),
        Route("/api/registry", guarded(dash.api_registry)),
        Route("/api/deployments", guarded(dash.api_deployments)),
        Route("/api/registry/{version}/compare", guarded(dash.api_compare)),
        Route("/api/registry/{version}/{action:str}", decide, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    middleware = [Middleware(SecurityHeaders), Middleware(AccessGuard, dashboard=dash)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.token = dash.token
    app.state.dashboard = dash
    return app
