"""OpenAI-style API errors: `APIError(status, message, param=None, code=None, type=None)`.

    raise APIError(400, "messages must not be empty", param="messages", code="empty_messages")
    err.body()  -> {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
    err.headers -> extra response headers (Retry-After for 429 / 503)

The type defaults from the status (400 invalid_request_error, 401 authentication_error, 404
not_found_error, 429 rate_limit_error, 503 server_busy_error, 5xx server_error).
"""

from __future__ import annotations

DEFAULT_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
                 503: "server_busy_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        self.type = type or DEFAULT_TYPES.get(status, fallback)
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    """A parameter this server does not implement (rejected rather than silently ignored)."""
    return APIError(400, f"{what} is not supported by this server", param=param, code="unsupported_parameter")
