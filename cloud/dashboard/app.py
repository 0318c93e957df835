"""The operator dashboard: a Starlette app over the telemetry store, the model
registry and the deployment service.

    app = create_app(TelemetryStore(path), registry=Registry(backend),
                     greengrass=backend.greengrassv2, token="s3cret")

Pages (``/``, ``/turbines/{id}``, ``/anomalies``, ``/registry``) are static
HTML + ``app.js`` that poll the JSON API below; charts are uPlot, served from
``/static/vendor`` (no CDN).

JSON API::

    GET  /api/fleet                       gateways, turbines, components, loss, deployment per device
    GET  /api/turbines/{id}/scores        ?since=<epoch s>&limit=<1..20000>
    GET  /api/anomalies                   ?since=&limit=&thing=
    GET  /api/registry                    model versions, status, metrics
    GET  /api/deployments                 latest deployment per target + per-device outcome
    POST /api/registry/{version}/approve  Authorization: Bearer <token>
    POST /api/registry/{version}/reject   Authorization: Bearer <token>; JSON {"reason": "..."}

Security: read-only requests from loopback need no token; any other client needs
the token (``Authorization: Bearer``, or the ``windfleet_token`` cookie set by
``/login?token=``).  Writes accept only the header (a cookie alone would allow
cross-site requests).  Tokens are compared in constant time.  The Host header
must name this machine when bound to loopback (DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import secrets
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from windfleet.cloud.ingest import THING_RE, TURBINE_RE, TelemetryStore

STATIC = Path(__file__).parent / "static"
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
MAX_LIMIT = 20_000
MAX_REASON = 500
COOKIE = "windfleet_token"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]

PAGES = {
    "overview": "Fleet overview",
    "turbine": "Turbine",
    "anomalies": "Anomaly timeline",
    "registry": "Model registry & deployments",
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


def _is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return host == "testclient"  # starlette's TestClient


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


class Dashboard:
    """The request handlers; ``create_app`` wires them into Starlette."""

    def __init__(self, store: TelemetryStore, registry: Any = None, greengrass: Any = None,
                 token: str | None = None, poll_ms: int = 2000):
        self.store, self.registry, self.greengrass = store, registry, greengrass
        self.token = token or secrets.token_urlsafe(24)
        self.poll_ms = poll_ms

    # ------------------------------------------------------------ auth
    def _token_ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def _bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def read_allowed(self, request: Request) -> bool:
        if _is_loopback(request.client.host if request.client else None):
            return True
        return self._token_ok(self._bearer(request)) or self._token_ok(request.cookies.get(COOKIE))

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

    async def login(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if not self._token_ok(token):
            return _error(401, "bad token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------ API: reads
    def deployments_by_device(self, things: list[str]) -> dict[str, Any]:
        if self.greengrass is None:
            return {}
        out: dict[str, Any] = {}
        for thing in things:
            try:
                resp = self.greengrass.list_effective_deployments(coreDeviceThingName=thing)
                latest = _latest(resp.get("effectiveDeployments", []), "modifiedTimestamp", "creationTimestamp")
                out[thing] = jsonable(latest)
            except Exception as exc:  # noqa: BLE001 - a device the service does not know yet
                out[thing] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return out

    async def api_fleet(self, request: Request) -> Response:
        fleet = self.store.fleet()
        deployments = self.deployments_by_device([g["thing"] for g in fleet["gateways"]])
        for gateway in fleet["gateways"]:
            gateway["deployment"] = deployments.get(gateway["thing"])
        fleet["deployments_available"] = self.greengrass is not None
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

    async def api_registry(self, request: Request) -> Response:
        if self.registry is None:
            return _json({"available": False, "versions": []})
        try:
            return _json({"available": True, "versions": registry_entries(self.registry)})
        except Exception as exc:  # noqa: BLE001 - show it, do not 500 the page
            return _json({"available": True, "versions": [], "error": f"{type(exc).__name__}: {exc}"[:300]})

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
    async def api_decide(self, request: Request) -> Response:
        if not self._token_ok(self._bearer(request)):
            return _error(401, "approve/reject need the dashboard token as 'Authorization: Bearer <token>'")
        version, action = request.path_params["version"], request.path_params["action"]
        if not VERSION_RE.match(version):
            return _error(400, "bad version")
        if self.registry is None:
            return _error(503, "no model registry configured")
        reason = ""
        if action == "reject":
            body = await request.body()
            if len(body) > 4096:
                return _error(413, "body too large")
            if body:
                try:
                    reason = json.loads(body).get("reason", "")
                except (ValueError, AttributeError):
                    return _error(400, "body must be a JSON object")
            if not isinstance(reason, str) or len(reason) > MAX_REASON:
                return _error(400, f"reason must be a string of at most {MAX_REASON} characters")
            reason = reason or "rejected from the dashboard"
        try:
            if action == "approve":
                result = self.registry.approve(version)
            else:
                result = self.registry.reject(version, reason)
        except (KeyError, LookupError) as exc:
            return _error(404, f"unknown version {version}: {exc}")
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "RegistryError" and str(exc).startswith("no model package version"):
                return _error(404, str(exc)[:300])  # the CLOUD registry's "unknown version"
            return _error(409, f"{type(exc).__name__}: {exc}"[:300])  # the registry's own one-line reason
        return _json({"version": version, "action": action, "result": result})


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
               token: str | None = None, *, loopback_only_hosts: bool = True, poll_ms: int = 2000) -> Starlette:
    """Build the dashboard app.  ``registry`` has ``list()/approve(v)/reject(v, reason)``;
    ``greengrass`` is a boto3-shaped greengrassv2 client (``list_deployments``,
    ``list_effective_deployments``).  Either may be None (the pages say so).
    ``app.state.token`` holds the token (generated when not given)."""
    dash = Dashboard(store, registry, greengrass, token, poll_ms)

    def guarded(handler: Callable) -> Callable:
        async def wrapper(request: Request) -> Response:
            if not dash.read_allowed(request):
                return _error(401, "token required from a non-loopback client")
            try:
                return await handler(request)
            except BadRequest as exc:
                return _error(400, str(exc))
        return wrapper

    async def decide(request: Request) -> Response:
        if request.path_params["action"] not in ("approve", "reject"):
            return _error(404, "unknown action (approve or reject)")
        return await dash.api_decide(request)

    routes = [
        Route("/", guarded(dash.overview)),
        Route("/turbines/{turbine_id}", guarded(dash.turbine_page)),
        Route("/anomalies", guarded(dash.anomalies_page)),
        Route("/registry", guarded(dash.registry_page)),
        Route("/login", dash.login),
        Route("/api/fleet", guarded(dash.api_fleet)),
        Route("/api/turbines/{turbine_id}/scores", guarded(dash.api_scores)),
        Route("/api/anomalies", guarded(dash.api_anomalies)),
        Route("/api/registry", guarded(dash.api_registry)),
        Route("/api/deployments", guarded(dash.api_deployments)),
        Route("/api/registry/{version}/{action:str}", decide, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    middleware = [Middleware(SecurityHeaders)]
    if loopback_only_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.token = dash.token
    app.state.dashboard = dash
    return app
