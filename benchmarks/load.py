"""Load test of `bgesmall serve`: requests/s, p50 and p99 latency at several concurrencies, batching on vs off.

    python benchmarks/load.py --model DIR                 # starts a server with batching on and one with it off
    python benchmarks/load.py --synthetic                 # the same on a random-weight bge-small-shaped checkpoint
    python benchmarks/load.py --url http://127.0.0.1:8000 # measures a server you started (one column)

Each of C clients sends one short sentence per request (POST /v1/embeddings, encoding_format float), waits for
the answer, and sends the next: a closed loop. Every level runs for --duration seconds or --max-requests
requests, whichever comes first, after a short warm-up, then stops; with two servers, each level alternates
between them in --rounds slices. Traffic goes to 127.0.0.1 only (the
script refuses other hosts). The clients speak minimal HTTP/1.1 on keep-alive connections, so that on a
2-core machine they take as little CPU as possible from the server they measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Short sentences (8-16 tokens), different per request so nothing can be cached.
SUBJECTS = ["The cat", "A small dog", "My neighbour", "The old train", "Our new server", "A quiet student",
            "The red kite", "This tiny model"]
VERBS = ["sat near", "walked past", "looked at", "ran towards", "talked about", "waited for"]
OBJECTS = ["the river bank", "a busy market", "the morning news", "an open window", "the last page",
           "a warm cup of tea"]


def sentence(i: int) -> str:
    return (f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[i // 8 % len(VERBS)]} "
            f"{OBJECTS[i // 48 % len(OBJECTS)]} on day {i}.")


@dataclass
class LevelResult:
    concurrency: int
    ok: int
    failed: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class Connection:
    """One keep-alive HTTP/1.1 connection; POST JSON, read a Content-Length response."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{self.extra}\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line, *header_lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def run_level(host: str, port: int, headers: dict[str, str], model: str | None, concurrency: int,
                    duration: float, max_requests: int, warmup: float) -> LevelResult:
    counter = iter(range(10**9))
    latencies: list[float] = []
    failed = 0
    measuring = False
    stop_at = 0.0
    issued = 0

    async def client():
        nonlocal failed, issued
        conn = Connection(host, port, headers)
        try:
            while time.perf_counter() < stop_at and (not measuring or issued < max_requests):
                body = {"input": sentence(next(counter)), "encoding_format": "float"}
                if model:
                    body["model"] = model
                if measuring:
                    issued += 1
                counted = measuring
                t0 = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(conn.post("/v1/embeddings", json.dumps(body).encode()), 60)
                    good = status == 200 and b'"embedding"' in payload
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                    good = False
                    await conn.close()
                if counted:
                    if good:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    else:
                        failed += 1
        finally:
            await conn.close()

    # warm-up: same clients, results discarded
    stop_at = time.perf_counter() + warmup
    await asyncio.gather(*(client() for _ in range(concurrency)))
    measuring = True
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LevelResult(concurrency, len(latencies), failed, time.perf_counter() - start, latencies)


def measure_level(url: str, args, concurrency: int, duration: float) -> LevelResult:
    parts = urllib.parse.urlsplit(url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return asyncio.run(run_level(parts.hostname, parts.port or 80, headers, args.model_name, concurrency,
                                 duration, args.max_requests, args.warmup))


def merge(parts: list[LevelResult]) -> LevelResult:
    return LevelResult(parts[0].concurrency, sum(p.ok for p in parts), sum(p.failed for p in parts),
                       sum(p.seconds for p in parts), [x for p in parts for x in p.latencies_ms])


def report(label: str, r: LevelResult) -> None:
    print(f"  {label}concurrency {r.concurrency:>3}: {r.rps:7.1f} req/s  p50 {r.pct(50):8.1f} ms  "
          f"p99 {r.pct(99):8.1f} ms  ({r.ok} ok, {r.failed} failed, {r.seconds:.1f} s)", flush=True)


def batching_counters(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            b = json.load(resp).get("batching", {})
    except OSError:
        return ""
    if not b.get("forward_passes"):
        return ""
    return (f"{b['requests']} requests in {b['forward_passes']} forward passes "
            f"(largest {b['largest_batch']} inputs)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, batching: bool, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bgesmall.server", "--port", str(port), "--log-level", "warning",
           "--max-wait-ms", str(args.max_wait_ms)]
    if model_dir:
        cmd += ["--model", model_dir]
    if args.model_name:
        cmd += ["--model-name", args.model_name]
    if not batching:
        cmd.append("--no-batching")
    print(f"$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, BGESMALL_API_KEY=args.api_key or "")
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="measure this running server (127.0.0.1/localhost only)")
    where.add_argument("--model", metavar="DIR", default=None,
                       help="start servers on this model folder (default: the one bgesmall finds)")
    where.add_argument("--synthetic", action="store_true",
                       help="start servers on a random-weight checkpoint with bge-small-en-v1.5's shapes "
                            "(12 layers, 384 wide: the same compute) made in a temporary folder")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds per level and server (default 10)")
    p.add_argument("--rounds", type=int, default=2,
                   help="split each level's time into this many on/off alternations (default 2)")
    p.add_argument("--max-requests", type=int, default=5000, help="cap on requests per level (default 5000)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="warm-up seconds before each measured slice, not counted (default 1)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the started servers' --max-wait-ms")
    p.add_argument("--model-name", default=None, help="model name to send (default: leave it out)")
    p.add_argument("--api-key", default=None, help="API key to send (and to give the servers started here)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)

    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"refusing to load-test {host}: only 127.0.0.1, localhost or ::1")
        url = args.url.rstrip("/")
        print(f"server at {url}")
        results = [measure_level(url, args, c, args.duration) for c in args.concurrency]
        for r in results:
            report("", r)
        print(f"  server: {batching_counters(url)}")
        return 1 if any(r.failed for r in results) else 0

    # Both servers run at once (the idle one costs nothing) and each level alternates between them for
    # --rounds rounds, so that background load drifting on a shared machine hits both sides alike.
    with tempfile.TemporaryDirectory(prefix="bgesmall-load-") as tmp:
        model_dir = args.model
        if args.synthetic:
            from bgesmall.synthetic import make_checkpoint

            model_dir = str(make_checkpoint(pathlib.Path(tmp) / "bge-small-synthetic", preset="bge-small"))
        servers = {}
        try:
            for batching in (True, False):
                servers[batching] = start_server(model_dir, batching, args)
            by_mode: dict[bool, list[LevelResult]] = {True: [], False: []}
            slice_s = args.duration / args.rounds
            for c in args.concurrency:
                parts: dict[bool, list[LevelResult]] = {True: [], False: []}
                for _ in range(args.rounds):
                    for batching in (True, False):
                        parts[batching].append(measure_level(servers[batching][1], args, c, slice_s))
                for batching in (True, False):
                    by_mode[batching].append(merge(parts[batching]))
                    report(f"batching {'on ' if batching else 'off'} ", by_mode[batching][-1])
            for batching in (True, False):
                print(f"  batching {'on ' if batching else 'off'} server: {batching_counters(servers[batching][1])}")
        finally:
            for proc, _ in servers.values():
                stop_server(proc)

    print(f"\nsummary (one run, {args.rounds} alternating rounds of {slice_s:g} s per level; latencies in ms)")
    print(f"{'clients':>7} | {'on req/s':>9} {'p50':>7} {'p99':>7} | {'off req/s':>9} {'p50':>7} {'p99':>7} | "
          f"{'on/off':>6} | failed")
    for on, off in zip(by_mode[True], by_mode[False]):
        ratio = on.rps / off.rps if off.rps else float("inf")
        print(f"{on.concurrency:>7} | {on.rps:9.1f} {on.pct(50):7.1f} {on.pct(99):7.1f} | "
              f"{off.rps:9.1f} {off.pct(50):7.1f} {off.pct(99):7.1f} | {ratio:5.2f}x | {on.failed + off.failed}")
    failures = sum(r.failed for rs in by_mode.values() for r in rs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
