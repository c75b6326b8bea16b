"""A fake Hugging Face hub on 127.0.0.1 for the download tests.

It answers like the real hub does for `{endpoint}/{repo}/resolve/{revision}/{filename}`:
- small (git) files: 200 with `ETag: "<git blob sha1>"`, `Content-Length`, `X-Repo-Commit`;
- large (LFS) files: 302 to a second server on 127.0.0.2 (the "CDN", another host) with
  `X-Linked-Etag: "<sha256>"`, `X-Linked-Size`, `X-Repo-Commit`; the CDN serves the bytes with Range support (206);
- 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound; 401 when a token is required
  and the request lacks it; a 307 within the hub for a renamed repo.
Failure modes for tests: `cut_once[name] = k` sends the full Content-Length but only k bytes, then closes
(the first GET of that file only); `corrupt` serves flipped bytes while announcing the true hash.
Every request is logged in `requests` as (server, method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_ID = "test-org/tiny-bert"
REVISION = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sample_files(seed: int = 0, model_bytes: int = 300_000) -> dict[str, bytes]:
    """Arbitrary but deterministic files with the names of a sentence-transformers BERT folder."""
    rng = random.Random(seed)
    return {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 8, "seed": seed}).encode(),
        "model.safetensors": rng.randbytes(model_bytes),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordPiece"}}).encode(),
        "modules.json": b'[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]',
        "1_Pooling/config.json": b'{"word_embedding_dimension": 8, "pooling_mode_cls_token": true}',
        "sentence_bert_config.json": b'{"max_seq_length": 512, "do_lower_case": true}',
    }


@dataclass
class HubState:
    files: dict[str, bytes]
    repo_id: str = REPO_ID
    revision: str = REVISION
    token: str | None = None  # when set, every hub request must carry `Authorization: Bearer <token>`
    renamed_from: str | None = None  # an old repo id answered with a 307 to the current one
    cut_once: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)
    cdn_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def by_sha256(self, digest: str) -> tuple[str, bytes] | None:
        for name, data in self.files.items():
            if hashlib.sha256(data).hexdigest() == digest:
                return name, data
        return None

    def gets(self, name_or_path: str, server: str | None = None) -> list[dict[str, str]]:
        """Headers of the GET requests whose path ends with the given text."""
        return [h for s, m, p, h in self.requests if m == "GET" and p.split("?")[0].endswith(name_or_path)
                and (server is None or s == server)]


def _handler(state: HubState, server_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # keep test output clean
            pass

        def _log(self):
            with state.lock:
                state.requests.append((server_name, self.command, self.path, dict(self.headers.items())))

        def _send(self, status: int, headers: dict[str, str], body: bytes = b""):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def do_HEAD(self):
            self._log()
            (self._hub if server_name == "hub" else self._cdn)()

        def do_GET(self):
            self._log()
            (self._hub if server_name == "hub" else self._cdn)()

        # -- the hub: resolve URLs --
        def _hub(self):
            m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)(\?.*)?", self.path)
            if m is None:
                return self._send(404, {"X-Error-Code": "EntryNotFound"}, b"not a resolve url")
            repo, rev, name = m["repo"], m["rev"], m["file"]
            if state.token is not None and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._send(401, {"X-Error-Code": "GatedRepo"}, b"Access to this repo is restricted")
            if state.renamed_from is not None and repo == state.renamed_from:
                new = self.path.replace(f"/{state.renamed_from}/", f"/{state.repo_id}/", 1)
                return self._send(307, {"Location": new})
            if repo != state.repo_id:
                return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found")
            if rev != state.revision:
                return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"Revision not found")
            if name not in state.files:
                return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": state.revision}, b"")
            data = state.files[name]
            common = {"X-Repo-Commit": state.revision}
            if state.is_lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                return self._send(302, {
                    **common,
                    "Location": f"{state.cdn_url}/cdn/{sha}?X-Amz-Signature=fake&response-content-disposition=x",
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_sha1(data)}"',
                })
            body = self._maybe_corrupt(name, data)
            return self._send(200, {**common, "ETag": f'"{git_sha1(data)}"', "Content-Length": str(len(data))}, body)

        # -- the CDN: bytes by sha256, with Range --
        def _cdn(self):
            m = re.fullmatch(r"/cdn/(?P<sha>[0-9a-f]{64})(\?.*)?", self.path)
            found = state.by_sha256(m["sha"]) if m else None
            if found is None:
                return self._send(404, {}, b"NoSuchKey")
            name, data = found
            data = self._maybe_corrupt(name, data)
            start = 0
            rng = self.headers.get("Range")
            if rng:
                r = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                if r is None or int(r[1]) >= len(data):
                    return self._send(416, {"Content-Range": f"bytes */{len(data)}"})
                start = int(r[1])
            body = data[start:]
            headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes", "ETag": f'"{m["sha"]}"'}
            status = 200
            if rng:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            with state.lock:
                cut = state.cut_once.pop(name, None) if self.command == "GET" else None
            if cut is not None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            return self._send(status, headers, body)

        def _maybe_corrupt(self, name: str, data: bytes) -> bytes:
            if name in state.corrupt:
                return bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            return data

    return Handler


def _cdn_server(handler) -> ThreadingHTTPServer:
    """The CDN on another loopback host (127.0.0.2), as the real CDN is another host than the hub; clients
    (ours and huggingface_hub) follow a redirect within the hub's host but read the metadata on one that leaves it.
    Falls back to 127.0.0.1 (another port) where 127.0.0.2 is not routed to loopback."""
    try:
        return ThreadingHTTPServer(("127.0.0.2", 0), handler)
    except OSError:
        return ThreadingHTTPServer(("127.0.0.1", 0), handler)


class FakeHub:
    """Two threaded servers on 127.0.0.1 (hub and CDN). Use as a context manager; `.url` is HF_ENDPOINT."""

    def __init__(self, files: dict[str, bytes] | None = None, **state_kwargs):
        self.state = HubState(files=dict(files if files is not None else sample_files()), **state_kwargs)
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, "hub"))
        self._cdn = _cdn_server(_handler(self.state, "cdn"))
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.state.cdn_url = "http://%s:%d" % self._cdn.server_address[:2]
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.02,), daemon=True)
                         for s in (self._hub, self._cdn)]

    def __enter__(self) -> FakeHub:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()

    @property
    def requests(self):
        return self.state.requests


if __name__ == "__main__":  # manual use: python tests/hubserver.py  -> serves sample files until Ctrl-C
    import time

    with FakeHub() as hub:
        print(f"HF_ENDPOINT={hub.url}  repo {REPO_ID}  revision {REVISION}", flush=True)
        while True:
            time.sleep(3600)
