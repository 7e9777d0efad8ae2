"""Request guard (pure ASGI middleware): what a browser or hostile client may not do, refused before routing.

    app.add_middleware(Guard, allowed_hosts=("localhost", "127.0.0.1", "::1"), allowed_origins=(),
                       max_headers=64, max_header_bytes=16384)

In order, each refusal an OpenAI-shaped JSON error with a stable code:
    more than max_headers request headers        431 too_many_headers
    headers over max_header_bytes in all         431 headers_too_large  (h11 bounds incomplete ones)
    a Host not in allowed_hosts ("*" = any)      400 host_not_allowed     (DNS rebinding)
    an Origin other than the server's own and    403 origin_not_allowed   (cross-site requests; CORS
    not in allowed_origins ("*" = any)                                     answers only allowed ones)
    a POST whose Content-Type is not JSON        415 unsupported_media_type  (text/plain and form
                                                                          bodies: a browser's simple
                                                                          cross-site POST)
Header bytes and idle connections are limited by uvicorn (server/app.uvicorn_limits).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from hotexperts.server.errors import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
JSON_TYPES = ("application/json",)


def host_name(host: str) -> str:
    """'Example.com:8080' -> 'example.com', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
                 allowed_origins: tuple[str, ...] = (), max_headers: int = 64, max_header_bytes: int = 16384):
        self.app, self.max_headers, self.max_header_bytes = app, max_headers, max_header_bytes
        self.hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.origins = set(allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                response = JSONResponse(error.body(), status_code=error.status,
                                        headers={"Connection": "close"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        raw = scope.get("headers") or []
        if len(raw) > self.max_headers:
            return APIError(431, f"more than {self.max_headers} request headers", code="too_many_headers")
        if sum(len(k) + len(v) for k, v in raw) > self.max_header_bytes:
            return APIError(431, f"request headers over {self.max_header_bytes} bytes",
                            code="headers_too_large")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return APIError(400, f"Host {host!r} is not allowed (serve --allowed-hosts)", param="Host",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host):
            return APIError(403, f"cross-origin requests from {origin!r} are not allowed "
                                 "(serve --cors-origin ORIGIN)", param="Origin", code="origin_not_allowed")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in JSON_TYPES:
                return APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                                param="Content-Type", code="unsupported_media_type")
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        return origin != "null" and urlsplit(origin).netloc.lower() == host.strip().lower()
