"""HTTP errors of the server, answered in OpenAI's error JSON shape.

Every problem a request can cause becomes an ``APIError`` carrying its HTTP status and
the fields of OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; the
app turns it into that JSON (plus headers such as ``Retry-After``). Clients written for
OpenAI (its Python client among them) then raise their usual exception classes.
"""

from __future__ import annotations

from typing import Any

from molmoe_lite.errors import MolmoeLiteError


class APIError(MolmoeLiteError):
    """A request the server refuses: HTTP status, OpenAI error type, and what to say."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is malformed or asks for something this server cannot do."""
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(name: str, served: str) -> APIError:
    return APIError(
        404, f"the model {name!r} does not exist here; this server serves {served!r}",
        param="model", code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the server's limit of {limit} bytes (--max-body-mb)",
                    code="request_too_large")


def busy(retry_after_s: int, message: str) -> APIError:
    """429 for a full queue: the client should retry after ``retry_after_s`` seconds."""
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def loading(retry_after_s: int = 2) -> APIError:
    return APIError(503, "the model is still loading; retry shortly", type="server_error",
                    code="model_loading", headers={"Retry-After": str(retry_after_s)})


def internal(message: str = "internal server error (logged on the server)") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
