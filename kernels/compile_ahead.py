"""A cold start compiles the kernels on two cores instead of one.

With numba's cache empty (the first use on a machine, or after an upgrade), compiling the kernels is most of
the start: about 5 s on one core of an AMD EPYC (Zen 5). numba compiles one function at a time under one lock, so
a second thread would not help; a second process does. When the cache lacks a kernel of CHILD_KERNELS (about
half of the compile: the linear layers', the layer norms' and GELU's), `begin()` starts a child Python that
compiles just those into numba's on-disk cache, while this process compiles the others (attention's, softmax's)
and goes on to load the weights. Here the child's share is decorated as kernels compiled at their first call; the
first such call joins the child (`join`) and then loads the kernel from the cache. Whatever happens to the child
(killed, failed, too slow, a cache it could not write), this process compiles what is missing itself: the child
can only make a start shorter.

No child when: the cache already has them (a warm start reads the index files of the share), one core, no idle core (of
the cores this process may run on, those that other processes keep in use while this one imports numba (a tenth
of a second at least), from /proc/stat, are within half a core of their count: the child would only take turns
with this process; the 1-minute load average where there is no
/proc/stat), numba's JIT is disabled, the cache cannot be written, the interpreter is not a plain `python`
executable (embedded in a server), or BGESMALL_COMPILE_AHEAD=0. And if the child is still compiling when this
process needs its share and has waited half as long again, the machine was busier than it looked: the
child is stopped and this process compiles the rest itself. BGESMALL_COMPILE_AHEAD=1 starts a child whatever
the load and waits for it (up to TIMEOUT_S).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import pickle
import subprocess
import sys
import threading
import time

CHILD_ENV = "BGESMALL_COMPILE_ONLY"  # set in the child: the kernels it compiles ("module.name", comma-separated)
SWITCH_ENV = "BGESMALL_COMPILE_AHEAD"
# The child's share, about half of the compile (AMD EPYC Zen 5, one process compiling all, from an empty cache:
# linear_panels 0.95 s, linear_split 0.8-0.9 s, the layer norms 0.45 s, bias_gelu 0.1 s and its erf; this process
# keeps attention_rows 1.1 s, attention_blocks 1.2 s and softmax_rows 0.2 s, numba's own start-up 0.4 s before the
# first of them, then reads and packs the weights, and finds the child done or waits 0-0.3 s. Without bias_gelu the
# child was done 0.4-0.8 s before it was needed; with softmax_rows too, 0.3-0.8 s after). Kernels that share
# helpers stay together: each process compiles the helpers of its own kernels.
CHILD_KERNELS = ("matmul.linear_panels", "matmul.linear_split", "layernorm.residual_layernorm",
                 "layernorm.embed_layernorm", "activations.bias_gelu")
TIMEOUT_S = 300.0
# numba's first compile in a process imports scipy.linalg, where it is installed, only to learn whether
# np.dot & co. could be compiled (numba/np/arraymath.py, _check_blas): 0.4-0.7 s of the child's time. No kernel
# calls them and the child's machine code is the same either way, so the child does not find scipy. (This process,
# the user's, keeps numba's check: its own numba code's np.correlate and np.convolve take BLAS's dot where found.)
CHILD_COMPILE = f"""
import importlib, os, sys
sys.modules["scipy"] = None  # numba would import it to look for BLAS: see the comment above
for kernel in os.environ[{CHILD_ENV!r}].split(","):  # decorated at import; one compiled at its first call, here
    module, name = kernel.split(".")
    getattr(getattr(importlib.import_module("bgesmall.kernels." + module), name), "dispatcher", lambda: None)()
"""
# then out at once: the cache files are written and closed, and the interpreter's cleanup (0.2-0.3 s) was waited for
CHILD_CODE = CHILD_COMPILE + "os._exit(0)\n"
_child = None  # the running child, until a kernel of its share is first needed


def in_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def compiles_here(module: str, name: str) -> bool:
    """Whether this process compiles kernel `name` of `module` (bgesmall.kernels.X) when it is decorated: in the
    child, only its share; here, all but the child's share while a child runs (those at their first call)."""
    only = os.environ.get(CHILD_ENV)
    if only:
        return _kernel(module, name) in only.split(",")
    return _child is None or not in_share(module, name)


def in_share(module: str, name: str) -> bool:
    """Whether kernel `name` of `module` is of the child's share."""
    return _kernel(module, name) in CHILD_KERNELS


def _kernel(module: str, name: str) -> str:
    return f"{module.rsplit('.', 1)[-1]}.{name}"  # bgesmall.kernels.matmul, linear_split -> "matmul.linear_split"


def join() -> None:
    """Wait for the child, if one is running (see `wait`): before the first call of a kernel of its share. Every
    thread that calls it waits (another thread's first call of another kernel of the share, too); a process
    forked from the one that started the child, which cannot wait for it, watches the cache instead."""
    global _child
    with _join_lock:
        child = _child
        if child is None:
            return
        if os.getpid() == child.owner:
            wait(child)
        else:
            _watch(child)
        _child = None


_join_lock = threading.Lock()


def _watch(child: subprocess.Popen) -> None:
    # a forked process: wait, with wait()'s patience, until the child's share is in the cache (or give up and
    # let this process compile what is missing)
    cache_dir = _cache_dir()
    deadline = time.monotonic() + _patience(child)
    while cache_dir is not None and not _cached(cache_dir) and time.monotonic() < deadline:
        time.sleep(0.05)


def _cache_dir() -> str | None:
    # numba's cache folder for this package's source files (the same locator its kernels get), or None
    try:
        from numba.core.caching import FunctionCache

        return FunctionCache(_cache_dir)._cache_path
    except Exception:  # noqa: BLE001 - no writable cache location anywhere: nothing to compile ahead into
        return None


def _cached(cache_dir: str) -> bool:
    # an index of each kernel of the child's share stamped with the kernel sources as they are now (sources_stamp: a
    # changed source gets a new index); anything unreadable: assume cached
    try:
        stamp = sources_stamp()
        for kernel in CHILD_KERNELS:
            if not any(_index_stamp(p) == stamp for p in glob.glob(os.path.join(cache_dir, f"{kernel}-*.nbi"))):
                return False
        return True
    except Exception:  # noqa: BLE001 - numba's internals moved: no child, the start compiles as it always did
        return True


@functools.lru_cache(maxsize=1)
def sources_stamp() -> bytes:
    """The source stamp every kernel's cache index carries (kernels/jit.py): a sha256 of all of this package's
    source files, not just the kernel's own (numba's default). A kernel compiles in the helpers and intrinsics of
    the other files (matmul.py's tiles in simd.py's vector operations, attention.py's exp in activations.py), so
    a change to any of them must invalidate every cached kernel, in a checkout as after an upgrade."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.digest()


def _index_stamp(path: str):
    # numba's index file: a pickled version, then a pickle of (source stamp, overloads)
    try:
        with open(path, "rb") as f:
            pickle.load(f)
            return pickle.loads(f.read())[0]
    except Exception:  # noqa: BLE001 - a truncated or foreign file stamps nothing
        return None


def cpu_snapshot() -> tuple[int, int, float, float] | None:
    """Where `busy_cores` measures from: the /proc/stat ticks of the cores this process may run on, and how many
    of them idle, this process's CPU time and the time; None where /proc/stat cannot be read."""
    try:
        mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    except AttributeError:  # not Linux
        mine = None
    try:
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                    continue
                v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
                total, idle = total + sum(v), idle + v[3] + v[4]
    except (OSError, ValueError, IndexError):
        return None
    return total, idle, time.process_time(), time.monotonic()


def busy_cores(cores: int, window_s: float = 0.1, since: tuple | None = None) -> float:
    """Of the cores this process may run on, how many other processes keep busy now: from their lines of /proc/stat
    less this process's own CPU time, from `since` (a cpu_snapshot: then this process measures while it works,
    instead of sleeping) and over `window_s` at least (the load average lags by a minute: right after a heavy
    job it still says busy, and it counts a job that just started as half idle; and it is the whole machine's,
    where a container may own 2 cores of 64). Where there is no /proc/stat: the 1-minute load average; where
    neither: 0 (assume idle cores)."""
    first = since or cpu_snapshot()
    if first is not None:
        time.sleep(max(0.0, window_s - (time.monotonic() - first[3])))
        last = cpu_snapshot()
        if last is not None and last[0] > first[0]:  # clamped: idle and iowait counters may step back (proc(5))
            ticks = last[0] - first[0]
            own = (last[2] - first[2]) * os.sysconf("SC_CLK_TCK")
            busy = ticks - (last[1] - first[1]) - own
            return min(float(cores), max(0.0, cores * busy / ticks))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def begin() -> None:
    """Start the child where one is worth it (`start`): its share of the kernels is then decorated here as kernels
    compiled at their first call, which joins it first and so finds them in the cache."""
    global _child
    _child = start()


def start() -> subprocess.Popen | None:
    """The child compiling CHILD_KERNELS, or None where none is worth starting (see the module's doc)."""
    if in_child() or os.environ.get(SWITCH_ENV, "1") == "0":
        return None
    since = cpu_snapshot()  # the busy check below measures over what this process does until then, numba's import
    import numba

    if numba.config.DISABLE_JIT:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if cores < 2:
        return None
    exe = os.path.basename(sys.executable or "")
    if not exe.startswith(("python", "pypy")):
        return None
    cache_dir = _cache_dir()
    if cache_dir is None or _cached(cache_dir):  # first: a warm start must not wait for the busy check below
        return None
    forced = os.environ.get(SWITCH_ENV) == "1"
    if busy_cores(cores, since=since) > cores - 0.5 and not forced:
        return None
    env = dict(os.environ, **{CHILD_ENV: ",".join(CHILD_KERNELS),
                              "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD_CODE], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    child.started = None if forced else time.monotonic()  # forced: no patience, wait for it
    child.owner = os.getpid()  # only this process can wait for it (not one forked from it)
    return child


def wait(child: subprocess.Popen | None) -> None:
    """Join the child, for at most half the time since it started (this process's own share of the compile, and
    whatever it did next until it needed the child's share, took that long; the child's share is about as large),
    and TIMEOUT_S in all; a child still running then is stopped. Its outcome
    does not matter, only the cache it leaves."""
    if child is None:
        return
    try:
        child.wait(timeout=_patience(child))
    except BaseException:  # too slow, or this process is being interrupted: do not leave it behind
        child.kill()
        child.wait()
        if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            raise


def _patience(child: subprocess.Popen) -> float:
    # how long more to wait for the child (see `wait`): half the time since it started, and a second
    started = getattr(child, "started", None)
    return TIMEOUT_S if started is None else min(TIMEOUT_S, 0.5 * (time.monotonic() - started) + 1.0)
