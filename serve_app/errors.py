"""Typed errors and the one set of handlers that turns every failure into
`{"error": {"type", "message", "param"}}` with the right status code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.protocol import InvalidRequestError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ServiceError(Exception):
    """An error with a status code meant for the client."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.error_type = error_type or _TYPE_BY_STATUS.get(status_code, "server_error")
        self.headers = dict(headers or {})


class ModelNotFoundError(ServiceError):
    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(
            404,
            f"model {model!r} does not exist; available: {', '.join(available)}",
            param="model",
        )


def error_response(
    status_code: int,
    message: str,
    param: str | None = None,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error body every failure uses."""
    body = {
        "error": {
            "type": error_type or _TYPE_BY_STATUS.get(status_code, "server_error"),
            "message": message,
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def _field_path(location: Sequence) -> str | None:
    # FastAPI prefixes body fields with "body"; list positions become ".N".
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) or None


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first invalid field; every problem is in the message.

    A body that is not JSON at all is a 400: no field is at fault.
    """
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(400, f"request body is not valid JSON: {detail}".rstrip(": "))
    problems = []
    for error in errors:
        path = _field_path(error.get("loc", ()))
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{path}: {message}" if path else message)
    first_param = _field_path(errors[0].get("loc", ())) if errors else None
    return error_response(422, "; ".join(problems), param=first_param)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers (unexpected exceptions are masked by RequestContextMiddleware)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.error_type, exc.headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(422, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, headers=exc.headers)
