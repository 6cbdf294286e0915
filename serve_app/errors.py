"""Typed errors and the one set of handlers that turns every failure into an error body
with the right status code.

Native routes answer ``{"error": {"type", "message", "param"}}``; the OpenAI-compatible
routes under /v1 answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with
OpenAI's status codes (an invalid parameter is a 400 there, not a 422), so OpenAI
clients raise their usual exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from deployments.protocol import AdapterLoadError, InvalidRequestError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
_OPENAI_CODE_BY_STATUS = {
    401: "invalid_api_key",
    404: "not_found",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}
OPENAI_PREFIX = "/v1/"


def route_path(scope: Scope) -> str:
    """The request path inside the application (without Serve's route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def speaks_openai(scope: Scope) -> bool:
    return route_path(scope).startswith(OPENAI_PREFIX)


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
    openai: bool = False,
) -> JSONResponse:
    """The error response every failure uses (OpenAI's shape when ``openai``)."""
    if openai and status_code == 422:
        status_code = 400  # OpenAI's status for an invalid parameter
    body = error_body(status_code, message, param, error_type, openai)
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def error_body(
    status_code: int, message: str, param: str | None = None, error_type: str | None = None, openai: bool = False
) -> dict:
    """The JSON body of an error, also sent as the last event of a failed stream."""
    error_type = error_type or _TYPE_BY_STATUS.get(status_code, "server_error")
    if not openai:
        return {"error": {"type": error_type, "message": message, "param": param}}
    code = "model_not_found" if status_code == 404 and param == "model" else _OPENAI_CODE_BY_STATUS.get(status_code)
    if status_code == 400:
        code = "invalid_value" if param else None
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _field_path(location: Sequence) -> str | None:
    # FastAPI prefixes body fields with "body"; list positions become ".N"; pydantic
    # names the branch of a union it tried ("str", "function-after[...]"), which is no
    # field of the request.
    parts = [
        str(part)
        for part in location
        if part != "body" and not (isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES))
    ]
    return ".".join(parts) or None


_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "list[str]", "TextPart"})


def validation_error_response(
    exc: RequestValidationError, openai: bool = False, required: Sequence[str] = ()
) -> JSONResponse:
    """422 (400 on /v1) naming the first invalid field; every problem is in the message.

    A body that is not JSON at all is a 400: no field is at fault. A missing body names
    the first of the route's ``required`` fields.
    """
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(400, f"request body is not valid JSON: {detail}".rstrip(": "), openai=openai)
    if required and any(error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",) for error in errors):
        fields = ", ".join(required)
        return error_response(
            422, f"the request has no body; send a JSON object with at least: {fields}", param=required[0], openai=openai
        )
    problems = []
    params = []
    for error in errors:
        # A rule on several fields names its field on the exception it raised.
        path = getattr(error.get("ctx", {}).get("error"), "param", None) or _field_path(error.get("loc", ()))
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{path}: {message}" if path else message)
        params.append(path)
    return error_response(422, "; ".join(problems), param=params[0] if params else None, openai=openai)


def _required_fields(scope: Scope) -> list[str]:
    """The required fields of the matched route's JSON body, in declaration order (or
    what its model says a body needs, where one of several fields will do)."""
    body_field = getattr(scope.get("route"), "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", {})
    return list(getattr(model, "BODY_NEEDS", ())) or [name for name, field in fields.items() if field.is_required()]


def adapter_failure(exc: AdapterLoadError) -> str:
    """What the client is told: the model replica's own words (across the handle the
    error is Ray's wrapper, which holds it as ``cause``)."""
    return str(getattr(exc, "cause", None) or exc)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers (unexpected exceptions are masked by RequestContextMiddleware)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc, speaks_openai(request.scope), _required_fields(request.scope))

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(
            exc.status_code, exc.message, exc.param, exc.error_type, exc.headers, speaks_openai(request.scope)
        )

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(422, exc.message, exc.param, openai=speaks_openai(request.scope))

    @app.exception_handler(AdapterLoadError)
    async def _adapter(request: Request, exc: AdapterLoadError) -> JSONResponse:
        return error_response(500, adapter_failure(exc), "model", openai=speaks_openai(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, headers=exc.headers, openai=speaks_openai(request.scope))
