"""Fuzz the server's request handling: arbitrary methods, paths, headers and bodies (raw bytes, or JSON built
from the input) into the ASGI app, in process (no sockets), with the batcher running.

A finding: an exception out of the app, a 5xx, a response without a complete body, or an error body not in
OpenAI's shape ({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import sys

from common import fuzz_main, small_model

KEY = "fuzz-key"
PATHS = ["/v1/embeddings", "/v1/models", "/v1/models/fuzz", "/v1/models/other", "/health", "/docs", "/openapi.json",
         "/v1/embeddings/", "/v1", "/", "/v1/models/fuzz/../x"]
METHODS = ["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
HEADER_NAMES = [b"content-type", b"authorization", b"content-length", b"transfer-encoding", b"accept",
                b"accept-encoding", b"x-anything"]
FIELDS = ["input", "model", "encoding_format", "dimensions", "user", "input_type", "truncate", "extra"]
ERROR_FIELDS = {"message", "type", "param", "code"}


class Bytes:
    """Reads choices and values off the fuzz input, front to back; an exhausted input reads as zeros."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def pick(self, options):
        return options[self.byte() % len(options)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data))


def json_value(b: Bytes, depth: int = 0):
    kind = b.byte() % (9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(b.byte() & 1)
    if kind == 2:
        return int.from_bytes(b.take(b.byte() % 10), "little", signed=True)
    if kind == 3:
        return b.byte() / 7.0 - 18.0
    if kind in (4, 5):
        return b.take(b.byte() % 64).decode("utf-8", "replace")
    if kind == 6:
        return [json_value(b, depth + 1) for _ in range(b.byte() % 6)]
    if kind == 7:
        return [int.from_bytes(b.take(2), "little") for _ in range(b.byte() % 16)]
    return {b.pick(FIELDS): json_value(b, depth + 1) for _ in range(b.byte() % 5)}


@functools.lru_cache(maxsize=None)
def served():
    """The app, its lifespan entered (batcher running), on an event loop of its own."""
    from bgesmall.server.app import create_app

    app = create_app(small_model(), model_name="fuzz", api_key=KEY, max_request_bytes=64 * 1024, max_wait_ms=0)
    loop = asyncio.new_event_loop()
    started = loop.create_future()

    async def receive():
        if not started.done():
            return {"type": "lifespan.startup"}
        await asyncio.Event().wait()  # no shutdown: the process ends

    async def send(message):
        if message["type"] == "lifespan.startup.complete":
            started.set_result(None)
        elif message["type"] == "lifespan.startup.failed":
            started.set_exception(RuntimeError(message.get("message")))

    app_task = loop.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    loop.run_until_complete(started)

    def shut_down():  # at exit: end the lifespan task (the batcher's worker) before the loop goes
        app_task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(app_task)
        loop.close()

    atexit.register(shut_down)
    return app, loop


def one_input(data: bytes) -> None:
    app, loop = served()
    b = Bytes(data)
    method, path = b.pick(METHODS), b.pick(PATHS)
    headers = []
    for _ in range(b.byte() % 5):
        value = b.take(b.byte() % 40).translate(None, b"\r\n\0")  # what an HTTP server lets through
        headers.append((b.pick(HEADER_NAMES), value))
    style = b.byte()
    if style & 1:
        headers.append((b"authorization", f"Bearer {KEY}".encode()))
    if style & 2:
        headers.append((b"content-type", b"application/json"))
    if style & 4:
        obj = {"input": json_value(b)} if style & 8 else json_value(b)
        if isinstance(obj, dict) and style & 16:
            obj.update({b.pick(FIELDS): json_value(b) for _ in range(b.byte() % 3)})
        body = json.dumps(obj).encode()
    else:
        body = b.rest()
    if style & 32:
        headers.append((b"content-length", str(len(body)).encode()))
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]] if style & 64 else [body]
    status, content_type, payload = loop.run_until_complete(_call(app, method, path, headers, chunks))
    assert status is not None, "no response"
    assert status < 500, (status, payload[:300])
    if status >= 400 and content_type.startswith(b"application/json") and method != "HEAD":
        error = json.loads(payload)["error"]
        assert set(error) == ERROR_FIELDS, error
        assert isinstance(error["message"], str) and error["message"]


async def _call(app, method: str, path: str, headers, chunks):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = {"status": None, "type": b"", "body": b"", "done": False}

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0)  # the request is over: only a disconnect can follow, after the response
        while not sent["done"]:
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["type"] = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")
            sent["done"] = not message.get("more_body", False)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 60)
    assert sent["done"], "the response body never completed"
    return sent["status"], sent["type"], sent["body"]


if __name__ == "__main__":
    fuzz_main(one_input, imports=("bgesmall", "bgesmall.server.app"))
    sys.exit(0)
