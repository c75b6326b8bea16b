"""The plan: which implementation runs each step of the encoder on this machine, and where it is kept.

A kernel tuned by hand on one CPU is not the fastest on the next, so bgesmall measures its candidates on the
machine it runs on, on the model's own shapes, the first time a model is loaded there (bgesmall/tune.py), and
keeps the answer, as FFTW keeps its "wisdom": a later load reads it back in a millisecond. The choices:

    linear         per linear layer shape and range of rows: tiles | tiles/48 | blas   (bgesmall/linear.py;
                   the tiles of the tier's weight format; blas in the exact tier only)
    query          a lone small pass (a query): split each product's panels over the cores, or run on one
    long_sequence  attention: from this many tokens a sequence runs as two BLAS products per head around the
                   numba softmax, shorter ones take the fused kernel (bgesmall/encoder.py)
    blocks_from    the fused kernel for heads of 32: a query row at a time below this many tokens, eight rows at
                   a time from it (kernels/attention.py)
    batch_tokens   tokens per forward pass

Every choice gives the same vectors to within the project's tolerances: the tiles variants are bit-identical
to each other, BLAS and the attention paths differ in summation order only (the tests force each one).

A plan file is kept per CPU (model name and the features numba compiles for), numba, llvmlite and numpy
versions, kernel sources, model shapes and thread count: `plan_dir()` / plan-<key>.json, written atomically
(a temporary file renamed into place, so two processes tuning at once never leave a torn file). An unreadable,
stale or corrupt file is ignored with one line on stderr and measured again; a read-only directory keeps the
plan in memory. `BGESMALL_PLAN` (or `load(plan=...)`) forces choices instead of measuring:

    BGESMALL_PLAN=default                          the built-in plan below, on every machine
    BGESMALL_PLAN=linear=blas,query=single         those choices, the built-in plan for the rest
    BGESMALL_PLAN=long_sequence=32,blocks_from=16,batch_tokens=2048
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .kernels.attention import VECTOR_FROM

ENV_PLAN = "BGESMALL_PLAN"
ENV_PLAN_DIR = "BGESMALL_PLAN_DIR"
FORMAT = 2  # bump when the file's layout or the meaning of a choice changes

LINEAR = ("tiles", "tiles/48", "blas")
QUERY = ("split", "single")
# Row counts at which linear layers are measured, each standing for a range: (from rows, rows measured).
# A query is 5-20 tokens, the last layer under CLS pooling has one row per text, a batch about 1024 tokens.
ROW_CLASSES = ((1, 8), (32, 64), (256, 512))
BATCH_TOKENS = (512, 1024, 2048)
ATTENTION_LENGTHS = (8, 12, 16, 24, 32, 48, 64, 128, 256)  # candidate thresholds; 513: the fused kernel at every length
BLOCK_LENGTHS = (12, 16, 24, 32, 48, 64)  # candidate blocks_from (beyond: 2 x the longest measured)
NEVER = 513


@dataclass(frozen=True)
class Plan:
    linear: dict[str, tuple[tuple[int, str], ...]]  # "in x out" -> ((from rows, implementation), ...), ascending
    query: str = "split"
    long_sequence: int = 16
    blocks_from: int = VECTOR_FROM
    batch_tokens: int = 1024
    source: str = "default"  # default | measured | cached | forced (...)
    timings: dict = field(default_factory=dict, compare=False)  # decision -> {candidate: seconds}, from tune

    def linear_choices(self, shape: tuple[int, int]) -> tuple[tuple[int, str], ...]:
        return self.linear.get(shape_key(shape), ((1, "tiles"),))

    def to_json(self) -> dict:
        d = asdict(self)
        d["linear"] = {k: [list(c) for c in v] for k, v in self.linear.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        """Rebuild a plan from its JSON form, checking every field (a bad one raises ValueError)."""
        if not isinstance(d, dict) or not isinstance(d.get("linear"), dict):
            raise ValueError("not a plan")
        def whole(v):  # a JSON integer, not a float, a string or a bool
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{v!r} is not a whole number")
            return v

        linear = {}
        for key, choices in d["linear"].items():
            parsed = tuple((whole(lo), str(name)) for lo, name in choices)
            if not parsed or any(name not in LINEAR or lo < 1 for lo, name in parsed):
                raise ValueError(f"bad linear choices for {key}")
            linear[str(key)] = tuple(sorted(parsed))
        plan = cls(linear=linear, query=d["query"], long_sequence=whole(d["long_sequence"]),
                   blocks_from=whole(d["blocks_from"]), batch_tokens=whole(d["batch_tokens"]),
                   source=str(d.get("source", "cached")), timings=d.get("timings") or {})
        plan.check()
        return plan

    def check(self) -> None:
        if self.query not in QUERY:
            raise ValueError(f"query={self.query!r}: valid: {', '.join(QUERY)}")
        if not 1 <= self.long_sequence <= NEVER:
            raise ValueError(f"long_sequence={self.long_sequence}: must be 1..{NEVER}")
        if not 1 <= self.blocks_from <= NEVER:
            raise ValueError(f"blocks_from={self.blocks_from}: must be 1..{NEVER}")
        if not 16 <= self.batch_tokens <= 1 << 16:
            raise ValueError(f"batch_tokens={self.batch_tokens}: must be 16..65536")

    def describe(self) -> list[str]:
        """One line per choice, for `bgesmall info` and `bgesmall tune`."""
        lines = [f"source: {self.source}"]
        for key, choices in sorted(self.linear.items()):
            lines.append(f"linear {key}: " + ", ".join(f"{lo}+ rows {name}" for lo, name in choices))
        lines.append(f"query: {self.query} ({'panels shared by the cores' if self.query == 'split' else 'one core'})")
        lines.append(f"attention: BLAS path from {self.long_sequence} tokens" if self.long_sequence < NEVER
                     else "attention: fused kernel at every length")
        lines.append(f"attention, heads of 32: eight query rows at a time from {self.blocks_from} tokens, one below"
                     if self.blocks_from < min(self.long_sequence, NEVER)
                     else "attention, heads of 32: a query row at a time")
        lines.append(f"batch: {self.batch_tokens} tokens per pass")
        return lines


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """The (in, out) shapes of one encoder layer's linear layers: QKV, attention output, FFN in, FFN out."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return list(dict.fromkeys([(h, 3 * h), (h, h), (h, f), (f, h)]))


def default_plan(cfg) -> Plan:
    """The built-in plan: bgesmall's tiles for every product, a lone query split, the fused attention kernel
    below 16 tokens, 1024 tokens per pass (the figures measured on AMD Zen 4 before the planner existed)."""
    return Plan(linear={shape_key(s): ((1, "tiles"),) for s in linear_shapes(cfg)})


def parse_forced(spec: str, cfg) -> Plan:
    """`linear=blas,query=single,...` -> the default plan with those choices; `default` -> the default plan."""
    plan = default_plan(cfg)
    spec = spec.strip()
    if spec.lower() == "default":
        return plan
    changes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in ("linear", "query", "long_sequence", "blocks_from", "batch_tokens"):
            raise ValueError(f"plan {spec!r}: {item!r} is not NAME=VALUE with NAME one of linear, query, "
                             "long_sequence, blocks_from, batch_tokens (or the whole plan 'default')")
        if key == "linear":
            if value not in LINEAR:
                raise ValueError(f"plan {spec!r}: linear={value!r} does not exist; valid: {', '.join(LINEAR)}")
            changes["linear"] = {k: ((1, value),) for k in plan.linear}
        elif key == "query":
            if value not in QUERY:
                raise ValueError(f"plan {spec!r}: query={value!r} does not exist; valid: {', '.join(QUERY)}")
            changes["query"] = value
        else:
            try:
                changes[key] = int(value)
            except ValueError:
                raise ValueError(f"plan {spec!r}: {key}={value!r} is not a whole number") from None
    plan = replace(plan, source=f"forced ({spec})", **changes)
    try:
        plan.check()
    except ValueError as e:
        raise ValueError(f"plan {spec!r}: {e}") from None
    return plan


# -- where plans are kept ---------------------------------------------------------------------------------


def plan_dir() -> Path:
    """$BGESMALL_PLAN_DIR; else beside numba's cache: $NUMBA_CACHE_DIR/bgesmall, the kernels' __pycache__ (numba's
    own in-tree cache) when writable, else ~/.cache/bgesmall/plans."""
    if os.environ.get(ENV_PLAN_DIR):
        return Path(os.environ[ENV_PLAN_DIR]).expanduser()
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"]).expanduser() / "bgesmall"
    in_tree = Path(__file__).resolve().parent / "kernels"
    if not in_tree.is_dir():  # a source checkout: kernels/ sits beside bgesmall/
        in_tree = Path(__file__).resolve().parent.parent / "kernels"
    if os.access(in_tree, os.W_OK):
        return in_tree / "__pycache__"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bgesmall" / "plans"


def fingerprint(cfg, threads: int, precision: str = "fp32") -> dict:
    """What a plan depends on: the CPU, the compilers and libraries, the kernels' code, the shapes, the threads,
    the tier (its weight format has kernels of its own)."""
    return {
        **_process_fingerprint(),
        "shapes": [cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers],
        "threads": threads,
        "precision": precision,
    }


@functools.lru_cache(maxsize=1)
def _process_fingerprint() -> dict:
    # the part that cannot change while a process runs (3-5 ms to gather: kernel sources, /proc/cpuinfo, LLVM's
    # host features), gathered once per process
    import llvmlite
    import numba
    import numpy as np

    from .kernels import compile_ahead, simd

    source = hashlib.sha256(compile_ahead.sources_stamp())  # every kernel source: any may change what is fastest
    return {
        "format": FORMAT,
        "cpu": cpu_name(),
        "features": simd.target_features(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "numpy": np.__version__,
        "kernels": source.hexdigest()[:16],
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan_path(fp: dict) -> Path:
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return plan_dir() / f"plan-{key}.json"


def read_plan(fp: dict) -> Plan | None:
    """The kept plan for this fingerprint, or None (with one line on stderr if a file was there but unusable)."""
    path = plan_path(fp)
    try:
        raw = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        _say(f"cannot read the kept plan {path} ({e.strerror}); measuring again")
        return None
    try:
        d = json.loads(raw)
        if d.get("fingerprint") != fp:
            raise ValueError("made for another machine or version")
        return replace(Plan.from_json(d["plan"]), source="cached")
    except KeyError as e:
        _say(f"ignoring the kept plan {path} (no {e}); measuring again")
        return None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        _say(f"ignoring the kept plan {path} ({e}); measuring again")
        return None


def write_plan(fp: dict, plan: Plan) -> Path | None:
    """Keep the plan (atomically); on failure say so once and return None (the plan still serves this process)."""
    path = plan_path(fp)
    try:
        write_atomically(path, lambda f: f.write(json.dumps({"fingerprint": fp, "plan": plan.to_json()}, indent=1).encode()))
    except OSError as e:
        _say(f"cannot keep the measured plan in {path.parent} ({e.strerror or e}); it is used in this process "
             f"only (set {ENV_PLAN_DIR} to a writable folder)")
        return None
    return path


def write_atomically(path: Path, fill, durable: bool = False) -> None:
    """Write a file through fill(binary file) under a temporary name in its folder, then rename it into place: a
    reader sees the old file or the whole new one, never a torn one, and two writers at once leave one whole
    file. durable: flushed to disk before the rename, so that a crash cannot leave the new name on unwritten
    (zero) blocks. OSError if it cannot be written (nothing is left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem.split('-')[0]}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _say(msg: str) -> None:
    print(f"bgesmall: {msg}", file=sys.stderr)
