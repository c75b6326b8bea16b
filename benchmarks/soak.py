"""Soak and fault test of `bgesmall serve`: a server run for minutes under rude and polite clients at once.

    python benchmarks/soak.py --minutes 10                       # the full run (issue 14, parts 5 and 6)
    python benchmarks/soak.py --minutes 0 --fault-seconds 20     # only the disconnect comparison and the drain

It starts `python -m bgesmall.server` on the bge-small-shaped checkpoint the other benchmarks use (random
weights, the real model's compute; see checkpoint.py) or on --model DIR, then runs three phases:

1. Disconnects (part 6). 12 clients each post 8 corpus paragraphs in a closed loop for --fault-seconds; then
   the same 12 run for --fault-seconds beside 2 clients that send the same request and hang up within 50 ms,
   again and again. Reported: requests/s of the 12 in both halves and their ratio (target >= 0.8).
2. Soak (part 5). 32 clients for --minutes: mixed request sizes (one short sentence, 8 paragraphs, 64 short
   sentences, one text over the 512-token limit, token-id arrays, base64 or float), 1% malformed requests
   (each must get a 4xx error in OpenAI's shape) and 1% requests whose client disconnects mid-request (half a
   body, or a whole one and gone within 50 ms). Reported: requests, failures of well-formed requests (target 0),
   the server's RSS after the first minute (warm-up) and at the end (target: growth <= 5%), its open file
   descriptors at both times (no growth), and p99 latency of the first and the last minute (last <= 1.5x first).
3. Drain. With the 32 clients busy, the server gets SIGTERM: every request sent before the signal must still
   get its 200 (target: 0 failed in flight), and the server must exit cleanly.

All traffic goes to 127.0.0.1; every loop is bounded in time. The clients speak minimal HTTP/1.1 (load.py's
Connection) in one asyncio loop, so they take little CPU from the server on a small machine. Exit status 1 when
a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from checkpoint import find_checkpoint
from load import Connection, free_port, stop_server
from workloads import corpus_paragraphs

HOST = "127.0.0.1"
PATH = "/v1/embeddings"
FAULT_CLIENTS = 12
RUDE_CLIENTS = 2
SOAK_CLIENTS = 32
HANG_UP_WITHIN_S = 0.05
REQUEST_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 5.0

MALFORMED = [  # bodies a confused or hostile client sends; each must be answered 400 in OpenAI's shape
    b'{"input": ',
    b'{"input": 5}',
    b"[1, 2, 3]",
    b'{"input": ""}',
    b'{"input": [[-1, 2]]}',
    b'{"input": "x", "encoding_format": "hex"}',
    b'{"input": ["a", 7]}',
    b'{"inputs": "typo"}',
    b'\xff\xfe{"input": "x"}',
    b'{"input": "x", "dimensions": 7}',
]


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0  # well-formed requests that did not get their 200 with the right number of rows
    malformed_ok: int = 0  # malformed requests answered 4xx with an OpenAI error body
    malformed_bad: int = 0  # malformed requests answered anything else
    disconnects: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, ms)
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(why)


def p99(ms: list[float]) -> float:
    if not ms:
        return float("nan")
    xs = sorted(ms)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


class Workload:
    """The request bodies, built once: (body bytes, number of inputs)."""

    def __init__(self, seed: int = 0):
        paras = corpus_paragraphs()
        self.rng = random.Random(seed)
        self.paragraph_requests = [paras[i : i + 8] for i in range(0, len(paras) - 8, 8)]
        sentences = [f"Sentence {i} about the weather, a train and a cup of tea." for i in range(4096)]
        long_text = " ".join(paras)[:20_000]  # far over 512 tokens: truncated by the server
        kinds = [
            lambda: [self.rng.choice(sentences)],
            lambda: self.rng.choice(self.paragraph_requests),
            lambda: self.rng.sample(sentences, 64),
            lambda: [long_text],
        ]
        self.mixed = [self._body(kind(), self.rng.choice(["float", "base64"])) for kind in kinds for _ in range(16)]
        self.mixed += [(json.dumps({"input": [[self.rng.randrange(1000, 30000) for _ in range(n)]
                                              for n in (5, 40, 300)]}).encode(), 3) for _ in range(8)]
        self.fault = [self._body(texts, "float") for texts in self.paragraph_requests]

    @staticmethod
    def _body(texts: list[str], encoding: str) -> tuple[bytes, int]:
        return json.dumps({"input": texts, "encoding_format": encoding}).encode(), len(texts)


async def post_checked(conn: Connection, body: bytes, n: int, tally: Tally, *, record: bool = True) -> None:
    t0 = time.perf_counter()
    try:
        status, payload = await asyncio.wait_for(conn.post(PATH, body), REQUEST_TIMEOUT_S)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
        await conn.close()
        tally.fail(f"{type(exc).__name__}: {exc}")
        return
    if status != 200:
        tally.fail(f"HTTP {status}: {payload[:200]!r}")
        return
    try:
        rows = len(json.loads(payload)["data"])
    except (ValueError, KeyError, TypeError):
        rows = -1
    if rows != n:
        tally.fail(f"{rows} rows for {n} inputs")
        return
    tally.ok += 1
    if record:
        tally.latencies.append((time.perf_counter(), (time.perf_counter() - t0) * 1000))


async def post_malformed(conn: Connection, body: bytes, tally: Tally) -> None:
    try:
        status, payload = await asyncio.wait_for(conn.post(PATH, body), REQUEST_TIMEOUT_S)
        error = json.loads(payload)["error"]
        good = 400 <= status < 500 and {"message", "type", "param", "code"} <= set(error)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
        await conn.close()
        good = False
    if good:
        tally.malformed_ok += 1
    else:
        tally.malformed_bad += 1


async def hang_up(port: int, body: bytes, rng: random.Random, *, half_body: bool = False) -> None:
    """Send a request on a fresh connection (all of it, or half the body) and close within 50 ms."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return
    sent = body[: len(body) // 2] if half_body else body
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    try:
        writer.write(head + sent)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0, HANG_UP_WITHIN_S))
    except OSError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


# -- phase 1: disconnects -------------------------------------------------------------------------------------

async def fault_half(port: int, work: Workload, seconds: float, rude: int) -> Tally:
    tally = Tally()
    stop_at = time.perf_counter() + seconds

    async def polite(k: int) -> None:
        conn = Connection(HOST, port, {})
        i = k
        try:
            while time.perf_counter() < stop_at:
                body, n = work.fault[i % len(work.fault)]
                await post_checked(conn, body, n, tally, record=False)
                i += FAULT_CLIENTS
        finally:
            await conn.close()

    async def rude_client(k: int) -> None:
        rng = random.Random(k)
        body, _ = work.fault[0]  # the same request, again and again
        while time.perf_counter() < stop_at:
            await hang_up(port, body, rng)
            tally.disconnects += 1

    await asyncio.gather(*(polite(k) for k in range(FAULT_CLIENTS)), *(rude_client(k) for k in range(rude)))
    return tally


# -- phase 2: soak ----------------------------------------------------------------------------------------------

def rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as fh:
        rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def soak_clients(port: int, work: Workload, tally: Tally, stop: asyncio.Event, seed: int,
                       in_flight: dict | None = None) -> None:
    """32 clients until `stop` is set; each request is well-formed (98%), malformed (1%) or abandoned (1%).

    in_flight, when given, counts well-formed requests sent and not yet answered (for the drain phase)."""

    async def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        conn = Connection(HOST, port, {})
        try:
            while not stop.is_set():
                roll = rng.random()
                if roll < 0.01:
                    await post_malformed(conn, rng.choice(MALFORMED), tally)
                elif roll < 0.02:
                    await hang_up(port, rng.choice(work.mixed)[0], rng, half_body=rng.random() < 0.5)
                    tally.disconnects += 1
                else:
                    body, n = rng.choice(work.mixed)
                    await post_checked(conn, body, n, tally)
        finally:
            await conn.close()

    await asyncio.gather(*(client(k) for k in range(SOAK_CLIENTS)))


async def soak(port: int, pid: int, work: Workload, minutes: float) -> dict:
    tally, stop = Tally(), asyncio.Event()
    start = time.perf_counter()
    warm_up_s = min(60.0, minutes * 60 / 5)
    samples: list[tuple[float, int, int]] = []

    async def sampler() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, *rss_and_fds(pid)))
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            except asyncio.TimeoutError:
                pass

    async def timer() -> None:
        await asyncio.sleep(minutes * 60)
        stop.set()

    await asyncio.gather(soak_clients(port, work, tally, stop, seed=1), sampler(), timer())
    end = time.perf_counter()
    warm = next((s for s in samples if s[0] >= warm_up_s), samples[0])
    busy = samples[-1]  # the last sample with all 32 clients connected: fds compare under the same load
    last = (end - start, *rss_and_fds(pid))  # after the clients left
    window = min(60.0, minutes * 60 / 3)
    first_ms = [ms for t, ms in tally.latencies if t - start <= warm_up_s + window and t - start > warm_up_s]
    if not first_ms:
        first_ms = [ms for t, ms in tally.latencies if t - start <= window]
    last_ms = [ms for t, ms in tally.latencies if end - t <= window]
    return {"seconds": round(end - start, 1), "requests": tally.ok + tally.failed, "ok": tally.ok,
            "failed": tally.failed, "failures": tally.failures, "malformed_answered_4xx": tally.malformed_ok,
            "malformed_answered_otherwise": tally.malformed_bad, "disconnects": tally.disconnects,
            "warm_up_s": warm_up_s, "rss_warm_mb": round(warm[1] / 2**20, 1), "rss_end_mb": round(last[1] / 2**20, 1),
            "rss_growth": round(last[1] / warm[1] - 1, 4), "fds_warm": warm[2], "fds_end": busy[2],
            "fds_idle": last[2],
            "p99_first_ms": round(p99(first_ms), 1), "p99_last_ms": round(p99(last_ms), 1),
            "window_s": window}


# -- phase 3: drain ---------------------------------------------------------------------------------------------

async def drain(port: int, proc: subprocess.Popen, work: Workload, busy_s: float) -> dict:
    """SIGTERM while 32 clients are busy; clients stop issuing at the signal and every request sent before
    it must still be answered 200."""
    tally, stop = Tally(), asyncio.Event()

    async def signal_later() -> None:
        await asyncio.sleep(busy_s)
        stop.set()  # no new requests from now on: only those in flight count
        proc.send_signal(signal.SIGTERM)

    await asyncio.gather(soak_clients(port, work, tally, stop, seed=2), signal_later())
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, lambda: proc.wait(timeout=120))
    return {"requests": tally.ok + tally.failed, "failed_in_flight": tally.failed, "failures": tally.failures,
            "exit_code": code}


def batching_counters(port: int) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=10) as resp:
        return json.load(resp)["batching"]


def start(model_dir: str, port: int, timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bgesmall.server", "--model", model_dir, "--port", str(port),
           "--log-level", "warning"]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout

    async def up() -> bool:
        conn = Connection(HOST, port, {})
        try:
            await conn.post(PATH, json.dumps({"input": "ready?"}).encode())
            return True
        except OSError:
            return False
        finally:
            await conn.close()

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before answering")
        if asyncio.run(up()):
            return proc
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"the server did not answer within {timeout} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10; 0 skips the soak)")
    p.add_argument("--fault-seconds", type=float, default=20.0,
                   help="length of each half of the disconnect comparison (default 20; 0 skips it)")
    p.add_argument("--drain-seconds", type=float, default=5.0,
                   help="busy time before SIGTERM in the drain phase (default 5)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="model folder (default: the bge-small-shaped checkpoint of the benchmarks)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures here")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)

    ckpt = find_checkpoint(args.model)
    print(f"model: {ckpt.path}{' (synthetic weights)' if ckpt.synthetic else ''}", flush=True)
    work = Workload()
    port = free_port()
    proc = start(str(ckpt.path), port, args.startup_timeout)
    result: dict = {"model": str(ckpt.path)}
    misses: list[str] = []
    try:
        if args.fault_seconds > 0:
            alone = asyncio.run(fault_half(port, work, args.fault_seconds, rude=0))
            rude = asyncio.run(fault_half(port, work, args.fault_seconds, rude=RUDE_CLIENTS))
            ratio = rude.ok / alone.ok if alone.ok else float("nan")
            counters = batching_counters(port)
            result["disconnects"] = {"seconds_each": args.fault_seconds, "polite_alone": alone.ok,
                                     "polite_beside_rude": rude.ok, "rude_requests": rude.disconnects,
                                     "ratio": round(ratio, 3), "failed": alone.failed + rude.failed,
                                     "server": counters}
            print(f"disconnects: 12 clients x 8 paragraphs served {alone.ok} requests in {args.fault_seconds:g} s "
                  f"alone, {rude.ok} beside 2 clients that hung up {rude.disconnects} times: {ratio:.2f}x "
                  f"({alone.failed + rude.failed} failed); server: {counters['abandoned_requests']} abandoned "
                  f"requests dropped, {counters['dropped_sequences']} of their sequences never computed, "
                  f"{counters['wasted_sequences']} computed for nobody", flush=True)
            if not ratio >= 0.8:
                misses.append(f"disconnect throughput ratio {ratio:.2f} < 0.8")
            if alone.failed + rude.failed:
                misses.append(f"{alone.failed + rude.failed} polite requests failed: {alone.failures + rude.failures}")
        if args.minutes > 0:
            s = asyncio.run(soak(port, proc.pid, work, args.minutes))
            result["soak"] = s
            print(f"soak: {s['requests']} well-formed requests in {s['seconds']} s, {s['failed']} failed; "
                  f"{s['malformed_answered_4xx']} malformed answered 4xx ({s['malformed_answered_otherwise']} "
                  f"otherwise); {s['disconnects']} disconnects; RSS {s['rss_warm_mb']} MB after "
                  f"{s['warm_up_s']:g} s -> {s['rss_end_mb']} MB ({s['rss_growth']:+.1%}); fds {s['fds_warm']} -> "
                  f"{s['fds_end']} (under load), {s['fds_idle']} once the clients left; p99 {s['p99_first_ms']} ms (first {s['window_s']:g} s after warm-up) -> "
                  f"{s['p99_last_ms']} ms (last {s['window_s']:g} s)", flush=True)
            if s["failed"] or s["malformed_answered_otherwise"]:
                misses.append(f"soak failures: {s['failed']} well-formed, {s['malformed_answered_otherwise']} "
                              f"malformed; {s['failures']}")
            if s["rss_growth"] > 0.05:
                misses.append(f"RSS grew {s['rss_growth']:.1%}")
            if s["fds_end"] > s["fds_warm"]:
                misses.append(f"open fds grew {s['fds_warm']} -> {s['fds_end']}")
            if not s["p99_last_ms"] <= 1.5 * s["p99_first_ms"]:
                misses.append(f"p99 drifted {s['p99_first_ms']} -> {s['p99_last_ms']} ms")
        d = asyncio.run(drain(port, proc, work, args.drain_seconds))
        result["drain"] = d
        print(f"drain: SIGTERM under 32 clients: {d['requests']} requests finished, {d['failed_in_flight']} "
              f"failed in flight; exit code {d['exit_code']}", flush=True)
        if d["failed_in_flight"]:
            misses.append(f"{d['failed_in_flight']} in-flight requests failed at SIGTERM: {d['failures']}")
        if d["exit_code"] not in (0, -signal.SIGTERM):
            misses.append(f"server exit code {d['exit_code']}")
    finally:
        stop_server(proc)
    result["misses"] = misses
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    for m in misses:
        print(f"MISSED: {m}", flush=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
