"""What the fuzz harnesses share: a small model made once per process, and the atheris entry point.

Each harness defines `one_input(data: bytes)`, which raises on a finding (a crash, a hang is libFuzzer's to
catch, an exception other than the documented ones, a wrong-shaped answer) and returns otherwise. The same
function replays the regression corpus in the normal test run (tests/test_fuzz_corpus.py), without atheris.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

# bgesmall's Python modules that get coverage instrumentation; not the numba kernels (bgesmall.kernels) or the
# encoder that calls them, since numba compiles from the bytecode that instrumentation rewrites.
INSTRUMENTED = ["bgesmall.config", "bgesmall.weights", "bgesmall.tokenizer", "bgesmall.model", "bgesmall.batching",
                "bgesmall.server.app", "bgesmall.server.batcher", "bgesmall.server.errors", "bgesmall.server.inputs"]
SMALL_VOCAB = 1000  # the first 1000 WordPiece tokens ([PAD], [UNK], [CLS], [SEP], [MASK], ...): a fast tokenizer


@functools.lru_cache(maxsize=None)
def small_checkpoint() -> Path:
    """The tiny synthetic preset (2 layers, 32 wide) over a 1000-token WordPiece vocabulary, in a temp folder."""
    from bgesmall.synthetic import _minilm_model_dir, make_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bgesmall-fuzz-"))
    tok = json.loads((_minilm_model_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["vocab"] = {t: i for t, i in tok["model"]["vocab"].items() if i < SMALL_VOCAB}
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < SMALL_VOCAB]
    (root / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    return make_checkpoint(root / "model", preset="tiny", seed=7, vocab_size=SMALL_VOCAB,
                           tokenizer_json=root / "tokenizer.json")


@functools.lru_cache(maxsize=None)
def small_model():
    import bgesmall

    return bgesmall.load(small_checkpoint(), threads=1)


def fuzz_main(one_input, imports=("bgesmall",)) -> None:
    """`python tests/fuzz/fuzz_X.py [libFuzzer flags] [corpus dirs]` (e.g. -runs=1000000, -max_total_time=60).

    The functions of the INSTRUMENTED modules get coverage instrumentation once everything is imported and the
    model is built; atheris's import hook cannot be used, as it breaks numba's compilation of the kernels."""
    import importlib
    import os

    import atheris

    # tokenizers' thread pool (rayon) costs more than it saves on a fuzz input's few short texts (71 against 34 us
    # for three of them), and keeps the other cores busy; the ids it returns are the same either way
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # every mutated config that loads is a new model shape, which bgesmall would measure and keep a plan for:
    # those plans go to a temporary folder, not beside the source tree's numba cache
    os.environ.setdefault("BGESMALL_PLAN_DIR", tempfile.mkdtemp(prefix="bgesmall-fuzz-plans-"))
    for name in imports:
        importlib.import_module(name)
    small_model()  # built (kernels compiled) before fuzzing starts, so that its cost is not an execution
    for name in INSTRUMENTED:
        if name in sys.modules:  # what this harness imported
            _instrument(sys.modules[name], atheris)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def _instrument(module, atheris) -> None:
    import inspect

    def functions_of(obj):
        for v in vars(obj).values():
            f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
            if inspect.isfunction(f) and f.__module__ == module.__name__:
                yield f
            elif inspect.isclass(v) and v.__module__ == module.__name__:
                yield from functions_of(v)

    for fn in functions_of(module):
        atheris.instrument_func(fn)
