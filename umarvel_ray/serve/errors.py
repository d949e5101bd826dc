"""One error type for the API: every client mistake becomes a status and a message naming it.

The body follows OpenAI's `{"error": {"message", "type", "param", "code"}}` so existing clients
surface the message; 500 is reserved for bugs.
"""

from __future__ import annotations

from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_configured",
    503: "overloaded_error",
}


class ApiError(Exception):
    """A client-visible error: HTTP status, message, the offending parameter and a stable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(exc: Any) -> ApiError:
    """A pydantic ValidationError -> 422 naming the first bad field (and every other one)."""
    problems = []
    first_param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        first_param = first_param or loc or None
        if err.get("type") == "extra_forbidden":
            problems.append(f"unknown field {loc!r}")
        else:
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
    return ApiError(422, "; ".join(problems) or "invalid request", first_param, "validation_error")
