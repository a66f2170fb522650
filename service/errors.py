"""RFC 9457 problem+json responses: every client mistake says what was wrong."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.models import Problem, encoder

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """Raised anywhere in a handler; rendered as problem+json by the app."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    """A problem+json response for `status` with a human `detail`."""
    body = encoder.encode(Problem(title=HTTPStatus(status).phrase, status=status, detail=detail))
    return Response(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem(exc.status, exc.detail, exc.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in the same problem+json shape."""
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem(exc.status_code, detail, exc.headers)


SERVER_ERROR = "the server failed to handle this request; it has been logged"


async def server_error_handler(request: Request, exc: Exception) -> Response:
    return problem(500, SERVER_ERROR)
