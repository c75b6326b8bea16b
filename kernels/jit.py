"""The one decorator policy for every kernel in this package (see `__init__.py`)."""

import ctypes
import functools
import threading
import warnings

import numba
from numba.core import codegen, compiler, cpu, typeinfer
from numba.core.environment import lookup_environment
from numba.core.caching import FunctionCache, NullCache
from numba.core.registry import CPUDispatcher

from . import compile_ahead

# Pure arithmetic leaves may reassociate and contract (FMA); nothing here assumes no NaN or no inf.
ARITH_FLAGS = {"contract", "reassoc", "arcp", "afn"}


def kernel(signature, *, fastmath=False):
    # error_model="numpy": a float division by zero gives inf as in C, instead of Python's ZeroDivisionError,
    # whose check on every division keeps LLVM from vectorizing a loop that divides.
    return _cached_njit(signature, nogil=True, fastmath=fastmath, error_model="numpy")


def inner(*, fastmath=False):
    """A function called only from kernels (a polynomial, one row's LayerNorm, a tile), compiled into each kernel
    that calls it for the types it passes, vector values among them.

    No signature and no cache of its own: its code is in each calling kernel's cache, so nothing is loaded for it
    when bgesmall starts (each cached function costs a start about 10 ms). And no CPython wrapper, which numba
    would otherwise compile for every signature a kernel calls it with (a third of a cold start's compile of the
    linear kernels): called from Python, as the tests do, it compiles a twin that has one (`_Inner`). And no
    machine code of its own either: LLVM IR that its callers link in (`_LinkOnlyLibrary`). Its fastmath flags
    travel with its instructions when LLVM inlines it."""
    options = dict(nogil=True, fastmath=fastmath, error_model="numpy")

    def decorate(fn):
        if numba.config.DISABLE_JIT:
            return fn
        return _Inner(py_func=fn, locals={}, targetoptions=dict(options, nopython=True, boundscheck=None,
                                                                  no_cpython_wrapper=True, no_cfunc_wrapper=True),
                      pipeline_class=_helper_pipeline())

    return decorate


class _Inner(CPUDispatcher):
    """A dispatcher compiled for kernels only: its overloads have no entry point that Python could call (numba's
    own call would jump into nothing), so a call from Python goes to a twin compiled with the same options and a
    wrapper."""

    _twin = None

    def __call__(self, *args, **kwargs):
        if self._twin is None:
            options = {k: v for k, v in self.targetoptions.items()
                       if k not in ("no_cpython_wrapper", "no_cfunc_wrapper", "nopython")}
            self._twin = numba.njit(pipeline_class=_KernelCompiler, **options)(self.py_func)
        return self._twin(*args, **kwargs)


class _LinkOnlyLibrary(codegen.JITCodeLibrary):
    """Where a helper's code goes: LLVM IR that the kernels calling it link in and optimize with their own code,
    never optimized as a module or made machine code by itself, since nothing calls it but those kernels (a
    Python call goes to the twin, `_Inner`). numba's own library does both for every function it compiles:
    for the helpers, 0.8-0.9 s of a cold start's 2.0 s in LLVM (one process compiling every kernel, AMD EPYC
    Zen 5), work that each calling kernel repeats on its copy. The kernels' machine code is the same either way
    but for LLVM's inlining order (their speed was measured unchanged: benchmarks/matmul.py, opprofile.py)."""

    def _optimize_final_module(self):
        pass  # the function passes ran as each function was added; the module passes run in each caller

    def _finalize_final_module(self):
        self._finalize_dynamic_globals()  # what numba's does before handing the module to its JIT, and no more
        self._verify_declare_only_symbols()
        self._finalized = True

    def get_pointer_to_function(self, name):
        self._ensure_finalized()
        return 0  # no machine code: nothing to point at (numba's "no such symbol")

    @property
    def codegen(self):
        return _HelperCodegen(self._codegen)


class _HelperCodegen:
    """numba's code generator, except where it sets a helper's environment pointer (which a helper reads only to
    print, raise an exception with values computed at run time, or enter object mode). That pointer lives in
    machine code, and the helper has none: numba would write through a null address. Each kernel that links the
    helper in has its copy, which `_KernelCompiler` fills once the kernel is compiled, and numba when it loads the
    kernel from the cache. (Other numba code calling a helper does not get its copy filled: only bgesmall's
    kernels call them.)"""

    def __init__(self, inner):
        self._inner = inner

    def set_env(self, env_name, env):
        _set_env(self._inner, env_name, env)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _set_env(gen, env_name: str, env) -> None:
    # numba's codegen.set_env, where the JIT has the pointer: else nothing to fill (numba's would write to 0)
    address = gen._engine.get_global_value_address(env_name)
    if address:
        ctypes.c_void_p.from_address(address).value = id(env)


class _HelperCompiler(compiler.Compiler):
    """numba's pipeline, compiling into a `_LinkOnlyLibrary`."""

    def compile_extra(self, func):
        if self.state.library is None:
            self.state.library = _LinkOnlyLibrary(self.state.targetctx.codegen(), func.__qualname__)
        return super().compile_extra(func)


class _KernelCompiler(compiler.Compiler):
    """numba's pipeline, for the kernels and the helpers' twins: then the environment pointers of the helpers that
    the kernel linked in are filled, as numba fills them when it loads a kernel from its cache."""

    def compile_extra(self, func):
        cres = super().compile_extra(func)
        library = getattr(cres, "library", None)
        for gv in getattr(getattr(library, "_final_module", None), "global_variables", ()):
            if gv.name.startswith("_ZN08NumbaEnv"):
                env = lookup_environment(gv.name)
                if env is not None:
                    _set_env(library._codegen, gv.name, env)
        return cres


@functools.lru_cache(maxsize=None)
def _helper_pipeline():
    # numba's own pipeline where its internals are not those that _LinkOnlyLibrary and _HelperCodegen stand in for
    # (another numba): the library's steps, and the one place numba sets a new function's environment pointer,
    # get_executable's `library.codegen.set_env(...)`
    needed = ("_finalize_dynamic_globals", "_verify_declare_only_symbols", "_optimize_final_module",
              "_finalize_final_module", "_ensure_finalized")
    names = getattr(getattr(cpu.CPUContext.get_executable, "__code__", None), "co_names", ())
    if {"codegen", "set_env"} <= set(names) and all(hasattr(codegen.JITCodeLibrary, n) for n in needed):
        return _HelperCompiler
    return compiler.Compiler


def leaf():
    """A small pure-arithmetic helper (a polynomial), where fastmath is safe: `inner` with ARITH_FLAGS."""
    return inner(fastmath=ARITH_FLAGS)


def helper():
    """`inner` without fastmath: the matmul tiles, whose sums must run in order."""
    return inner()


def first_call_kernel(signature, *, fastmath=False):
    """A kernel compiled (or loaded from the cache) at its first call, not at import: for code that only some
    CPUs can compile (the bf16 kernels need AVX512_BF16), which a machine without it must never compile, and
    for code that only some models run (attention over heads that are not 32 wide), which must not lengthen
    every cold start."""

    def decorate(fn):
        return _FirstCallKernel(fn, signature, nogil=True, fastmath=fastmath, error_model="numpy")

    return decorate


def parallel_kernel(signature):
    """The one kernel that forks and joins threads (numba's threading layer): see bgesmall/threads.py, split_pass.

    Compiled (or loaded from the cache) at its first call, not at import, because loading a parallel kernel
    starts the threading layer (GNU OpenMP), and a process that forks must not have it running."""

    def decorate(fn):
        return _FirstCallKernel(fn, signature, nogil=True, parallel=True, error_model="numpy")

    return decorate


class _FirstCallKernel:
    """A kernel compiled (or loaded from the cache) when first called, or when `dispatcher()` is asked for."""

    def __init__(self, fn, signature, **options):
        self.py_func, self.signature, self.options = fn, signature, options
        self._shared = compile_ahead.in_share(fn.__module__, fn.__name__)  # a compile-ahead child may compile it
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__
        self._disp = None
        self._lock = threading.Lock()

    def dispatcher(self):
        if self._disp is None:
            with self._lock:
                if self._disp is None:
                    if self._shared:
                        compile_ahead.join()  # the compile-ahead child may be compiling it: its result, first
                    self._disp = _compile_cached(self.py_func, self.signature, self.options)
        return self._disp

    def __call__(self, *args):
        return (self._disp or self.dispatcher())(*args)


def _cached_njit(signature, **options):
    """numba.njit(signature, cache=True, **options), except that the on-disk cache can only speed a start up:
    a cache that cannot be found, read or written (read-only install and home, an unwritable NUMBA_CACHE_DIR,
    a full disk, a corrupt or truncated file) means compiling in memory, with one warning per process; and a
    kernel found in the cache loads without numba's full target refresh (see _GuardedCache.load_overload)."""

    def decorate(fn):
        if not compile_ahead.compiles_here(fn.__module__, fn.__name__):  # the other process's share of a cold start
            return _FirstCallKernel(fn, signature, **options)
        return _compile_cached(fn, signature, options)

    return decorate


def _compile_cached(fn, signature, options):
    # no signature yet: nothing is compiled before the cache is in place
    disp = numba.njit(pipeline_class=_KernelCompiler, **options)(fn)
    if not isinstance(disp, numba.core.dispatcher.Dispatcher):  # NUMBA_DISABLE_JIT: the plain function
        return disp
    disp._cache = _GuardedCache.for_function(fn)  # what Dispatcher.enable_caching() sets, made safe
    with typeinfer.register_dispatcher(disp):  # as numba.njit(signature) does: compile now, then refuse others
        disp.compile(signature)
    disp.disable_compile()
    return disp


class _GuardedCache(FunctionCache):
    """numba's per-function disk cache, whose every failure is a cache miss instead of an exception."""

    @classmethod
    def for_function(cls, fn):
        try:
            cache = cls(fn)
        except Exception as exc:  # RuntimeError "no locator available": no writable cache folder anywhere
            _warn_once(exc)
            return NullCache()
        if hasattr(cache, "_cache_file") and hasattr(cache._cache_file, "_source_stamp"):
            # stale when any kernel source changes, not only this function's file (compile_ahead.sources_stamp)
            cache._cache_file._source_stamp = compile_ahead.sources_stamp()
        return cache

    def load_overload(self, sig, target_context):
        """The cached kernel, or None. numba's own version first "refreshes" the target context, importing every
        typing and lowering registry numba has (its random, datetime and cffi support among them): 0.3-0.6 s,
        most of a warm start, which loaded machine code does not need but for the runtime's (NRT's) symbols. A
        miss compiles, and the compiler refreshes by itself (numba/core/compiler.py)."""
        try:
            load = getattr(self, "_load_overload", None)
            if load is None:  # numba's internals moved: its own way, refresh and all
                return super().load_overload(sig, target_context)
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return load(sig, target_context)
            return None  # the guard swallowed a spurious I/O error: compile instead
        except Exception as exc:  # a corrupt index or data file fails to unpickle; an unreadable one, OSError
            _warn_once(exc)
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as exc:  # read-only or full disk
            _warn_once(exc)


_warned = False


def _warn_once(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"bgesmall: numba's kernel cache cannot be used ({type(exc).__name__}: {exc}); the kernels are "
            "compiled in memory instead (same results, a slower start). Point NUMBA_CACHE_DIR at a writable "
            "folder to cache them.",
            RuntimeWarning,
            stacklevel=2,
        )
