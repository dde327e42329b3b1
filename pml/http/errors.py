"""pml errors → HTTP statuses with a JSON body; anything unexpected is a 500 without details.

The status of each PmlError comes from its ``code`` (the same names gRPC and the audit log
use), so a new error class needs no change here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pml.errors import InvalidArgument, PmlError
from pml.http.schemas import ErrorBody, FieldViolation

log = logging.getLogger(__name__)

STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
}
STATUS_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 409: "FAILED_PRECONDITION"}

# Documented on every route, so clients (and the schema checks) know every answer's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "INVALID_ARGUMENT: `fieldViolations` names each bad field and why"},
    401: {"model": ErrorBody, "description": "UNAUTHENTICATED: missing, unknown or revoked key, or no account"},
    403: {"model": ErrorBody, "description": "PERMISSION_DENIED"},
    404: {"model": ErrorBody, "description": "NOT_FOUND: no such object in the caller's account"},
    409: {"model": ErrorBody, "description": "FAILED_PRECONDITION or ALREADY_EXISTS: the object's state forbids the call"},
    500: {"model": ErrorBody, "description": "INTERNAL: a bug; the server's log has the details"},
}


def _answer(status: int, body: ErrorBody) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(by_alias=True), status_code=status, headers=headers)


def pml_error(exc: PmlError) -> JSONResponse:
    status = STATUS.get(exc.code, 500)
    if status == 500:
        log.error("pml error %s mapped to 500: %s", type(exc).__name__, exc)
        return _answer(500, ErrorBody(code="INTERNAL", message="internal error; the server's log has the details"))
    violations = [FieldViolation(field=f, description=d) for f, d in exc.violations] if isinstance(exc, InvalidArgument) else []
    return _answer(status, ErrorBody(code=exc.code, message=str(exc), field_violations=violations))


def _field(loc: tuple[Any, ...]) -> str:
    """FastAPI's error location → the field path clients send ("query.pageSize" → "pageSize")."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(body)"


def _violation(error: dict[str, Any]) -> tuple[str, str]:
    """One FastAPI/pydantic error as (field, reason); a body that does not parse is the body's fault
    (FastAPI puts the character offset where a field would be)."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        reason = (error.get("ctx") or {}).get("error", "")
        return "(body)", f"not valid JSON{where}" + (f": {reason}" if reason else "")
    return _field(loc), str(error.get("msg", "invalid"))


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the ErrorBody shape."""

    @app.exception_handler(PmlError)
    async def _pml(request: Request, exc: PmlError) -> JSONResponse:
        return pml_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        violations = [_violation(e) for e in exc.errors()]
        return pml_error(InvalidArgument(violations))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODE.get(exc.status_code, "INTERNAL" if exc.status_code >= 500 else "INVALID_ARGUMENT")
        return _answer(exc.status_code, ErrorBody(code=code, message=str(exc.detail)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Details could carry SQL parameters or record content: log them, never answer them.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _answer(500, ErrorBody(code="INTERNAL", message="internal error; the server's log has the details"))
