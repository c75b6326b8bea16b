"""A dependency-free progress line on stderr (done, rate, and the time left when the total is known), shown only
on a terminal."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`initial`: work already done before this run (a resumed job); it counts in the total, not in the rate."""

    def __init__(self, total: int | None, *, enabled: bool = True, stream=None, unit: str = "texts", initial: int = 0):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.unit, self.done, self.initial = total, unit, initial, initial
        self.start = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            eta = ""
            if self.total is not None and rate > 0 and self.total > self.done:
                eta = f"  ETA {_duration((self.total - self.done) / rate)}"
            self.stream.write(f"\r{self.done}{of} {self.unit}  {rate:,.1f} {self.unit}/s{eta}   ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done > self.initial:
            self.stream.write("\n")
            self.stream.flush()
