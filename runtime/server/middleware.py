"""Pure ASGI middleware around every request: an ``x-request-id`` on every response, and the optional API key."""
from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse

from .protocol import APIError

REQUEST_ID = "x-request-id"
OPEN_PATHS = ("/health",)          # answered without the API key (load balancers' probes)


def request_id_of(value: str | None) -> str:
    """The client's id when it is a sane header value (printable ASCII, at most 200 characters), else a new one."""
    if value and len(value) <= 200 and value.isascii() and value.isprintable():
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Echoes the client's ``x-request-id`` (or makes one up) on the response; the id is also in
    ``request.state.request_id`` for handlers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_of(Headers(scope=scope).get(REQUEST_ID))
        scope.setdefault("state", {})["request_id"] = rid

        async def _send(msg):
            if msg["type"] == "http.response.start":
                MutableHeaders(scope=msg)[REQUEST_ID] = rid
            await send(msg)

        await self.app(scope, receive, _send)


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every path but :data:`OPEN_PATHS` (constant-time compare);
    anything else is answered 401 before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = Headers(scope=scope).get("authorization")
        scheme, _, token = (auth or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key):
            return await self.app(scope, receive, send)
        msg = ("missing API key: send it as 'Authorization: Bearer <key>'" if auth is None else
               "invalid API key (send the server's --api-key as 'Authorization: Bearer <key>')")
        err = APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
