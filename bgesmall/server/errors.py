"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, for every failure the server
returns (our own, FastAPI's request validation, unknown routes and methods, uncaught exceptions)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("bgesmall.server")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote the caller's text, lone surrogates included,
    which Starlette's UTF-8 JSONResponse cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class OpenAIError(Exception):
    """An error answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> ErrorResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(status: int, message: str, **fields: Any) -> tuple[int, bytes]:
    """For the raw ASGI middleware, which answers before FastAPI sees the request."""
    return status, json.dumps(error_body(message, **fields)).encode()


_INPUT_SHAPES = ("a string, an array of strings, an array of token ids (integers), "
                 "or an array of token-id arrays")


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 -> OpenAI's 400, naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "We could not parse the JSON body of your request: send a JSON object with "
                                "Content-Type: application/json.", code="invalid_json")
    if not loc:
        return OpenAIError(400, f"The request body must be a JSON object with an 'input' field ({first['msg']}).")
    field = loc[0]
    if field == "input":
        if first.get("type") == "missing":
            return OpenAIError(400, "'input' is a required property: " + _INPUT_SHAPES + ".", param="input")
        # A union error lists one complaint per alternative: say what is accepted instead.
        return OpenAIError(400, f"Invalid 'input': it must be {_INPUT_SHAPES}.", param="input",
                           code="invalid_type")
    param = field + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    return OpenAIError(400, f"Invalid '{param}': {first['msg']}.", param=param, code="invalid_value")


_STATUS_CODES = {404: "unknown_url", 405: "method_not_allowed"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> ErrorResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> ErrorResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ErrorResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        else:
            message = str(exc.detail)
        type_ = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
        return OpenAIError(exc.status_code, message, type=type_, code=_STATUS_CODES.get(exc.status_code),
                           headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ErrorResponse:
        log.exception("unhandled error for %s %s", request.method, request.url.path)
        return OpenAIError(500, "The server had an error while processing your request.",
                           type=SERVER_ERROR).response()
