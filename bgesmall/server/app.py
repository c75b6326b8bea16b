"""The OpenAI-compatible FastAPI app: POST /v1/embeddings, GET /v1/models, GET /health, /openapi.json and
an offline /docs page (docs.py).

    app = create_app(bgesmall.load(), model_name="BAAI/bge-small-en-v1.5", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPBearer

from .batcher import Batcher, BatchingConfig, Overloaded
from .docs import docs_page
from .errors import SERVER_ERROR, OpenAIError, error_bytes, install_handlers
from .inputs import prepare_input
from .schemas import DEFAULT_MODEL_NAME, MAX_INPUTS, EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelList

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # 2048 token arrays of 510 ids fit with room to spare
# Requests at least this large are tokenized (characters or ids) or serialized (rows) on a worker thread,
# so that a big request does not stall the event loop for everyone else; small ones are cheaper inline.
_OFFLOAD_CHARS = 20_000
_OFFLOAD_ROWS = 64

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
RETRY_AFTER_SECONDS = 1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up first"; nobody receives it, the log shows it


def create_app(model: Any, *, model_name: str = DEFAULT_MODEL_NAME, api_key: str | None = None,
               batching: bool = True, max_batch_tokens: int = BatchingConfig.max_batch_tokens,
               max_batch_size: int = BatchingConfig.max_batch_size, max_wait_ms: float = BatchingConfig.max_wait_ms,
               max_queued_requests: int = BatchingConfig.max_queued_requests,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_inputs: int = MAX_INPUTS) -> FastAPI:
    """model: a loaded bgesmall.Model (anything with its dim, max_tokens, config.vocab_size, tokenize and
    embed_token_ids; its precision, the tier that runs, is reported by /health and /v1/models, "fp32" for a
    stand-in without one). api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`."""
    config = BatchingConfig(enabled=batching, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                            max_wait_ms=max_wait_ms, max_queued_requests=max_queued_requests)
    batcher = Batcher(lambda ids: model.embed_token_ids(ids, add_special_tokens=True, truncate=True),
                      dim=model.dim, config=config)
    created = int(time.time())
    precision = getattr(model, "precision", "fp32")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with _single_threaded_blas():
            await batcher.start()
            try:
                yield
            finally:
                await batcher.stop()

    app = FastAPI(title="bgesmall embeddings server",
                  description=f"OpenAI-compatible embeddings for `{model_name}` ({model.dim} dimensions), "
                              "computed locally by bgesmall.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # FastAPI's pages load scripts from a CDN
    app.state.model = model
    app.state.batcher = batcher
    install_handlers(app)

    # Documents the bearer scheme on /docs; enforcement is in _GuardMiddleware, which runs before the body
    # is parsed so that an unauthenticated request gets 401 whatever it sent.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(HTTPBearer(auto_error=False))], responses=_ERRORS)

    @v1.post("/embeddings", response_model=EmbeddingResponse, summary="Create embeddings")
    async def create_embeddings(request: EmbeddingRequest, http: Request) -> Response:
        if request.model is not None and request.model != model_name:
            raise OpenAIError(404, f"The model '{request.model}' does not exist: this server serves "
                                   f"'{model_name}'.", param="model", code="model_not_found")
        if request.dimensions is not None and request.dimensions != model.dim:
            raise OpenAIError(400, f"This model has a fixed width of {model.dim} dimensions and cannot return "
                                   f"{request.dimensions}: leave 'dimensions' out or send {model.dim}.",
                              param="dimensions", code="invalid_value")
        try:
            batcher.check_capacity()  # before tokenizing: under overload, refusing must stay cheap
            prepare = functools.partial(prepare_input, model, request.input, query=request.input_type == "query",
                                        truncate=request.truncate, max_inputs=max_inputs)
            prepared = await _maybe_offload(prepare, _input_size(request.input) >= _OFFLOAD_CHARS)
            vectors = await _unless_client_leaves(http, batcher.submit(prepared.ids))
        except ValueError as exc:  # the model refused an input the checks above let through
            raise OpenAIError(400, str(exc), param="input") from exc
        except _ClientLeft:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Overloaded as exc:  # the official client retries a 503 by itself, after Retry-After
            raise OpenAIError(503, f"The server is overloaded ({exc}); retry in a moment.", type=SERVER_ERROR,
                              code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        encode = functools.partial(_embedding_json, vectors, request.encoding_format or "float", model_name,
                                   prepared.prompt_tokens)
        body = await _maybe_offload(encode, len(vectors) >= _OFFLOAD_ROWS)
        return Response(body, media_type="application/json")

    @v1.get("/models", response_model=ModelList, summary="List models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, created, precision)]}

    @v1.get("/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(model_id: str) -> dict:
        if model_id != model_name:
            raise OpenAIError(404, f"The model '{model_id}' does not exist: this server serves '{model_name}'.",
                              param="model", code="model_not_found")
        return _model_card(model_name, created, precision)

    app.include_router(v1)

    @app.get("/health", summary="Liveness and batching counters")
    async def health() -> dict:
        stats = batcher.stats
        return {"status": "ok", "model": model_name, "precision": precision, "dim": model.dim,
                "max_tokens": model.max_tokens,
                "batching": {"enabled": config.enabled, "max_batch_tokens": config.max_batch_tokens,
                             "max_wait_ms": config.max_wait_ms, "queued_requests": batcher.queued_requests,
                             "admitted_requests": batcher.admitted_requests,
                             "max_queued_requests": config.max_queued_requests, "refused_requests": stats.refused,
                             "requests": stats.requests, "sequences": stats.sequences,
                             "forward_passes": stats.batches, "largest_batch": stats.largest_batch,
                             "abandoned_requests": stats.abandoned, "dropped_sequences": stats.dropped_sequences,
                             "wasted_sequences": stats.wasted_sequences}}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.title))

    app.add_middleware(_GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes)
    return app


def _single_threaded_blas():
    """Hold numpy's BLAS at one thread for the server's life. The engine does this around every forward
    pass and restores the previous count after it; in a server, passes follow each other closely, and
    switching the count back and forth was seen to wake OpenBLAS's spinning threads between passes (stalls
    of 0.5-2 s on 2 busy cores). The engine's threads, not BLAS's, use the cores."""
    try:
        from bgesmall.threads import single_threaded_blas
    except ImportError:
        return contextlib.nullcontext()
    return single_threaded_blas()


def _model_card(name: str, created: int, precision: str) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "bgesmall", "precision": precision}


def _input_size(input: Any) -> int:
    if isinstance(input, str):
        return len(input)
    return sum(len(x) if isinstance(x, (str, list)) else 1 for x in input)


class _ClientLeft(Exception):
    """The client closed its connection before its embeddings were ready."""


async def _unless_client_leaves(http: Request, work):
    """Await the coroutine `work`, unless the client disconnects first: then cancel it and raise _ClientLeft.

    Cancelling a batcher submission drops the request's sequences that no forward pass has taken yet (its
    future is cancelled; the batcher skips cancelled jobs), so work nobody waits for is never computed. The
    body has been read by now, so the next ASGI message can only be http.disconnect (the client left, or the
    response was sent)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this handler itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientLeft
    return task.result()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _maybe_offload(fn, offload: bool):
    return await asyncio.to_thread(fn) if offload else fn()


def _embedding_json(vectors: np.ndarray, encoding_format: str, model_name: str, prompt_tokens: int) -> bytes:
    """vectors: [n, dim] float32 -> the response body. base64 is of little-endian float32 bytes, which is
    what the official client decodes (np.frombuffer(..., dtype="float32"))."""
    if encoding_format == "base64":
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = vectors.tolist()
    body = {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "model": model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json.dumps(body, separators=(",", ":")).encode()


class _GuardMiddleware:
    """Raw ASGI, ahead of FastAPI: the API key on /v1/*, then the request-body size limit (413), checked
    on Content-Length and again while the body streams in (chunked uploads)."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer YOUR_KEY'."
                           if given is None else "Incorrect API key provided.")
                return await _send_error(send, 401, message, code="invalid_api_key",
                                         extra_headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return await self._too_large(send)
        if length is not None or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body here, counting, and replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}],
                                             then=receive), send)

    async def _too_large(self, send):
        return await _send_error(send, 413, f"The request body is larger than this server's limit of "
                                            f"{self.max_request_bytes} bytes: send fewer or shorter inputs per "
                                            "request.", code="request_too_large")


def _replay(messages, then=None):
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        return await then() if then else {"type": "http.disconnect"}

    return receive


async def _send_error(send, status: int, message: str, *, code: str, extra_headers=()) -> None:
    status, body = error_bytes(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})
