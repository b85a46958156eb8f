"""One error shape for every failed API request: ``{"error": MESSAGE, "field": NAME | null}``.

``field`` names the query parameter or body member that was wrong, when one was (the same name
the client sent); ``error`` says what was expected. FastAPI's validation errors, Starlette's
404/405 and the API's own refusals all take this shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.log import kv

log = logging.getLogger("edgecc.api")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    """What went wrong and what was expected, for a person."""
    field: str | None = None
    """The query parameter or body member at fault, when one is."""


class ApiError(Exception):
    """A refusal with its status, message, field and extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_response(status: int, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A JSONResponse in the API's error shape."""
    return JSONResponse({"error": message, "field": field}, status_code=status,
                        headers=dict(headers or {}))


def field_of(loc: Sequence[Any]) -> str | None:
    """The client's name for a validation error location (``("query", "calls")`` → calls)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "body", "path", "header", "cookie"):
        where, parts = parts[0], parts[1:]
        if not parts:
            return where  # the body as a whole (not JSON, not an object)
    return ".".join(parts) or None


def _validation_message(error: Mapping[str, Any], field: str | None) -> str:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "missing":
        return f"{field}: required" if field else message
    return f"{field}: {message}" if field else message


def _keyed(error: Mapping[str, Any]) -> tuple[tuple[Any, ...], str] | None:
    """A model validator's complaint about a key below the model (``appliance.config``'s
    keyed ValueError, carrying ``path``): the full location and its own message, so the
    answer names e.g. ``relax[0].drop`` rather than the body as a whole."""
    cause = (error.get("ctx") or {}).get("error")
    path = getattr(cause, "path", None)
    if not isinstance(cause, ValueError) or not isinstance(path, tuple) or not path:
        return None
    return (*error.get("loc", ()), *path), str(cause)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    keyed = _keyed(first)
    if keyed is not None:
        loc, message = keyed
        field = field_of(loc)
        return error_response(422, f"{field}: {message}" if field else message, field)
    field = field_of(first.get("loc", ()))
    return error_response(422, _validation_message(first, field), field)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI answers 400 when the body is not even text/JSON it can read.
    field = "body" if exc.status_code == 400 and "body" in str(exc.detail) else None
    return error_response(exc.status_code, str(exc.detail), field, exc.headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.field, exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(kv(event="api_error", path=request.url.path, error=type(exc).__name__))
    return error_response(500, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` take the API's shape."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(Exception, _on_unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all of shape ErrorBody."""
    text = {400: "Bad request", 401: "No valid bearer token (or wrong credentials at login)",
            403: "The token's role may not do this", 411: "Length required",
            413: "Request body too large", 422: "A parameter or body member is invalid; "
            "field names it", 429: "Too many failed logins: the user is locked for a while",
            409: "Conflicts with the current state (e.g. in use elsewhere); error says why",
            412: "If-Match names a config version that is no longer the installed one",
            428: "If-Match (the config version read) is required", 404: "Not found",
            503: "Not available on this appliance"}
    return {s: {"model": ErrorBody, "description": text.get(s, "Error")} for s in statuses}
