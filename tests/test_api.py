"""The public API as a user calls it: shapes, order, errors that say what to do, bad input never lost."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bgesmall
from bgesmall.batching import token_budget_batches
from bgesmall.synthetic import make_checkpoint


def test_shapes_order_and_unit_rows(minilm):
    texts = ["the cat sat on the mat", "a completely different topic: tax law", "the cat sat on the mat"]
    v = minilm.embed(texts)
    assert v.shape == (3, minilm.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(v[0], v[2])
    assert v[0] @ v[1] < 0.9


def test_empty_list_and_empty_string(minilm):
    assert minilm.embed([]).shape == (0, minilm.dim)
    v = minilm.embed([""])
    assert v.shape == (1, minilm.dim) and np.isfinite(v).all()
    assert minilm.count_tokens([""]) == [2]  # [CLS] [SEP]


def test_non_string_item_is_a_type_error_naming_its_index(minilm):
    with pytest.raises(TypeError, match="input 2 is int"):
        minilm.embed(["a", "b", 3])
    with pytest.raises(TypeError, match="single str"):
        minilm.embed("not a list")


def test_overlong_input_truncates_by_default_or_raises(minilm):
    long = "word " * 1000
    assert minilm.count_tokens([long]) == [minilm.max_tokens]
    assert minilm.embed(["ok", long]).shape == (2, minilm.dim)
    with pytest.raises(ValueError, match=r"input 1 has 1002 tokens, over this model's limit of 256"):
        minilm.embed(["ok", long], truncate=False)
    assert minilm.count_tokens([long], truncate=False) == [1002]


def test_hostile_strings_are_embedded_and_others_keep_their_place(minilm):
    odd = [
        "control \x01\x02\x1b[31m chars",
        "nul \x00 inside",
        "emoji 🎉🔥👩‍👩‍👧",
        "lone surrogate \ud800 here",
        "x" * 100_000,
        "\t\n\r ",
        "日本語とEnglish mixed",
    ]
    texts = []
    for s in odd:
        texts += ["plain sentence before", s]
    v = minilm.embed(texts)
    assert v.shape == (len(texts), minilm.dim) and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    alone = minilm.embed(["plain sentence before"])[0]
    for i in range(0, len(texts), 2):
        np.testing.assert_allclose(v[i], alone, atol=1e-6)
    for i, s in enumerate(odd):
        np.testing.assert_allclose(v[2 * i + 1], minilm.embed([s])[0], atol=1e-6)


def test_queries_get_the_bge_instruction(minilm):
    q = minilm.embed_queries(["what is a cat"])
    np.testing.assert_array_equal(q, minilm.embed([bgesmall.QUERY_INSTRUCTION + "what is a cat"]))
    assert bgesmall.QUERY_INSTRUCTION == "Represent this sentence for searching relevant passages: "


def test_token_ids_round_trip(minilm):
    texts = ["hello world", "another one, a bit longer than the first"]
    ids = minilm.tokenize(texts, add_special_tokens=False)
    np.testing.assert_array_equal(minilm.embed_token_ids(ids), minilm.embed(texts))
    full = minilm.tokenize(texts)
    np.testing.assert_array_equal(minilm.embed_token_ids(full, add_special_tokens=False), minilm.embed(texts))
    with pytest.raises(ValueError, match="input 1 has a token id outside"):
        minilm.embed_token_ids([[1, 2], [10**9]])
    with pytest.raises(TypeError, match="input 0"):
        minilm.embed_token_ids([["a"]])


def test_encode_like_sentence_transformers(minilm):
    texts = ["one", "two three", "four five six"]
    np.testing.assert_array_equal(minilm.encode(texts, batch_size=2), minilm.embed(texts))
    single = minilm.encode("one")
    assert single.shape == (minilm.dim,)
    np.testing.assert_array_equal(single, minilm.embed(["one"])[0])


def test_embed_iter_streams_in_order(minilm):
    texts = [f"sentence number {i}" for i in range(23)]
    blocks = list(minilm.embed_iter(iter(texts), chunk_size=5))
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(np.concatenate(blocks), minilm.embed(texts), atol=1e-6)


def test_model_facts(minilm):
    assert (minilm.dim, minilm.max_tokens, minilm.pooling) == (384, 256, "mean")
    assert minilm.config.num_hidden_layers == 6
    assert 22_000_000 < minilm.num_parameters < 23_000_000


def test_token_budget_batches_keep_order_and_budget():
    lengths = [5, 5, 5, 20, 1, 1]
    batches = list(token_budget_batches(lengths, 10))
    assert batches == [[0, 1], [2], [3], [4, 5]]
    assert [i for b in batches for i in b] == list(range(6))


# -- loading errors -------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path):
    return make_checkpoint(tmp_path / "tiny", preset="tiny", seed=3)


def test_missing_folder_and_files_say_what_to_do(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="does not exist.*bgesmall download"):
        bgesmall.load(tmp_path / "nowhere")
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        bgesmall.load(tiny_dir)


def test_unsupported_activation_and_architecture(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(bgesmall.ModelLoadError, match="hidden_act='gelu_new' is not supported"):
        bgesmall.load(tiny_dir)
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta", "architectures": ["RobertaModel"]}))
    with pytest.raises(bgesmall.ModelLoadError, match="not a BERT encoder"):
        bgesmall.load(tiny_dir)
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 0}))
    with pytest.raises(bgesmall.ModelLoadError, match="num_hidden_layers=0: each must be a whole number >= 1"):
        bgesmall.load(tiny_dir)


def _rewrite_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file(edit(tensors), str(folder / "model.safetensors"))


def test_missing_or_misshaped_tensor_names_file_tensor_and_shapes(tiny_dir):
    _rewrite_tensors(tiny_dir, lambda t: {k: v for k, v in t.items() if "layer.1.output.dense.weight" not in k})
    with pytest.raises(bgesmall.ModelLoadError, match=r"model.safetensors: tensor 'encoder.layer.1.output.dense.weight' is missing \(expected shape"):
        bgesmall.load(tiny_dir)


def test_misshaped_tensor(tiny_dir):
    def bad(t):
        k = next(k for k in t if k.endswith("layer.0.intermediate.dense.bias"))
        t[k] = t[k][:-1].copy()
        return t

    _rewrite_tensors(tiny_dir, bad)
    with pytest.raises(bgesmall.ModelLoadError, match=r"'encoder.layer.0.intermediate.dense.bias' has shape \(\d+,\), expected \(\d+,\)"):
        bgesmall.load(tiny_dir)


def test_bert_prefix_is_accepted(tiny_dir, tmp_path):
    want = bgesmall.load(tiny_dir).embed(["prefix check"])
    other = tmp_path / "prefixed"
    shutil.copytree(tiny_dir, other)
    _rewrite_tensors(other, lambda t: {(k if k.startswith("bert.") else "bert." + k): v for k, v in t.items()})
    np.testing.assert_array_equal(bgesmall.load(other).embed(["prefix check"]), want)


def test_corrupt_safetensors_is_a_clear_error(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(bgesmall.ModelLoadError, match="not a readable safetensors file"):
        bgesmall.load(tiny_dir)


def test_library_never_imports_heavy_frameworks(minilm_dir):
    code = (
        "import sys, bgesmall, bgesmall.cli\n"
        f"m = bgesmall.load({str(minilm_dir)!r}); m.embed(['hi'])\n"
        "bad = [n for n in ('torch', 'transformers', 'onnxruntime', 'fastapi', 'uvicorn', 'sentence_transformers',\n"
        "                   'langchain', 'langchain_core', 'llama_index', 'haystack', 'chromadb', 'pyarrow', 'ray') if n in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_name_of_a_hugging_face_cache_snapshot(tiny_dir, tmp_path):
    snap = tmp_path / "models--BAAI--bge-small-en-v1.5" / "snapshots" / "5c38ec7c"
    shutil.copytree(tiny_dir, snap)
    assert bgesmall.load(snap).name == "BAAI/bge-small-en-v1.5"
    assert bgesmall.load(tiny_dir).name == "tiny"


def test_settings_are_checked_where_they_are_given(minilm, minilm_dir):
    with pytest.raises(ValueError, match="batch_size must be"):
        minilm.encode(["a", "b"], batch_size=0)
    with pytest.raises(ValueError, match="threads must be"):
        bgesmall.load(minilm_dir, threads=0)
    with pytest.raises(TypeError, match="single str"):
        next(minilm.embed_iter("hello"))
    with pytest.raises(ValueError, match="chunk_size must be"):
        next(minilm.embed_iter(["a"], chunk_size=0))
    with pytest.raises(TypeError, match="input 7 is int"):
        list(minilm.embed_iter(["a"] * 7 + [3], chunk_size=5))


def test_split_surrogate_pair_is_the_character_and_a_lone_one_one_replacement(minilm):
    np.testing.assert_array_equal(minilm.embed(["a \ud83d\ude00 b"]), minilm.embed(["a 😀 b"]))
    np.testing.assert_array_equal(minilm.embed(["x \ud800 y"]), minilm.embed(["x \ufffd y"]))


@pytest.mark.parametrize("query_before_fork", [False, True])
def test_query_in_a_forked_child(minilm_dir, query_before_fork, tmp_path):
    # A query shares its matmuls among the cores in a numba OpenMP region, and GNU OpenMP kills a child forked
    # after it started. A child forked right after load() (a pre-fork server, a "fork" multiprocessing pool) or
    # after a query must still answer, on one thread.
    code = f"""
import os, numpy as np, bgesmall
m = bgesmall.load({str(minilm_dir)!r}, threads=2)
if {query_before_fork}:
    want = m.embed(["how do python generators work"])
pid = os.fork()
if pid == 0:
    got = m.embed(["how do python generators work"])
    np.save("child.npy", got)
    os._exit(0)
_, status = os.waitpid(pid, 0)
want = m.embed(["how do python generators work"])
got = np.load("child.npy")
print("child", os.waitstatus_to_exitcode(status), "equal", bool(np.array_equal(got, want)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["child", "0", "equal", "True"], r.stdout + r.stderr


def test_a_query_splits_only_when_alone_and_only_on_the_split_thread():
    import threading

    from bgesmall import threads

    seen = []

    def forward(parts):
        seen.append((parts, threading.current_thread().name))
        return parts

    here = threading.current_thread().name
    threads.run_small_pass(1, forward)  # one thread asked for: the plan's choice on this thread
    assert seen == [(1, here)]
    seen.clear()
    with threads.engine_pass():  # a batch is running: the query stays on its own thread
        threads.run_small_pass(2, forward)
    threads.run_small_pass(2, forward)
    if threads._split_state["usable"]:  # numba has OpenMP or TBB here
        # beside the batch, the split's kernels on this thread (the same numbers); alone, split
        assert seen == [(threads.ONE_CORE_SPLIT, here), (2, "bgesmall-split_0")]
    else:
        assert seen == [(1, here), (1, here)]


def test_split_guard_stops_splitting_while_split_passes_run_slow_and_tries_again_later():
    from bgesmall.threads import SplitGuard

    guard = SplitGuard()
    for _ in range(3):  # quiet: every pass splits, and the fastest one is the estimate
        assert guard.split_now(7)
        guard.record(7, 0.010)
    assert guard.split_now(7)
    guard.record(7, 0.030)  # another process holds a core: 3x slow, a strike (nothing to compare with yet)
    assert not guard.split_now(7)  # so the next pass runs on one thread, to compare
    guard.record(7, 0.020, split=False)
    assert guard.split_now(7)
    guard.record(7, 0.030)  # MARGIN times slower than one thread: the second strike
    assert guard.split_now(7)
    guard.record(7, 0.030)  # and the third
    rested = [guard.split_now(7) for _ in range(guard.REST)]
    assert rested == [False] * guard.REST  # one thread for the next REST passes of that size
    assert guard.split_now(700)  # other sizes are judged on their own
    assert guard.split_now(7)  # then a split is tried again; quiet again, it stays
    guard.record(7, 0.010)
    assert [guard.split_now(7) for _ in range(5)] == [True] * 5


def test_split_guard_keeps_splitting_through_a_blip_and_when_the_whole_machine_slows_down():
    from bgesmall.threads import SplitGuard

    guard = SplitGuard()
    guard.record(7, 0.010)  # quiet: split 10 ms
    guard.record(7, 0.030)  # a blip: one strike, and one pass on one thread to compare (15 ms)
    assert not guard.split_now(7)
    guard.record(7, 0.015, split=False)
    for _ in range(guard.FRESH + 4):
        assert guard.split_now(7)
        guard.record(7, 0.010)
    # everything 3x slower (a throttled CPU): split 30 ms, one thread 45 ms; the split stays, and one pass in
    # FRESH runs on one thread to check that it still pays
    ran = []
    for _ in range(4 * guard.FRESH):
        split = guard.split_now(7)
        ran.append(split)
        guard.record(7, 0.030 if split else 0.045, split)
    assert ran.count(False) <= 5, ran


def test_split_guard_keeps_splitting_through_a_quiet_machines_noise():
    # a quiet machine's spread (Zen 5, 7-token queries: split 2.5-2.9 ms at the median, one thread 3.3-3.5 ms,
    # now and then a burst of split passes slower than the one-thread median): every pass but the comparisons
    # splits (with no margin, each burst sent the next 64 passes to one thread)
    from bgesmall.threads import SplitGuard

    guard, rng = SplitGuard(), np.random.default_rng(0)
    ran = []
    for i in range(300):
        split = guard.split_now(7)
        ran.append(split)
        noisy = i % 25 < 6  # a burst every 25 passes: split passes 1.5x the quiet ones, a little slower than one
        # thread's (which the first of them has the guard measure), below 1.25x it: three and more in a row
        guard.record(7, (0.0040 if noisy else 0.0026 + 0.0003 * rng.random()) if split else 0.0034, split)
    assert ran.count(False) <= 0.05 * len(ran), ran.count(False)


def test_a_query_beside_a_busy_core_runs_on_one_thread_after_three_slow_splits_and_a_comparison():
    import time

    from bgesmall import threads

    threads.run_small_pass(2, lambda parts: parts)  # probe the split thread
    if not threads._split_state["usable"]:
        pytest.skip("numba has no OpenMP or TBB threading layer here: queries never split")
    guard, seen = threads.SplitGuard(), []

    def forward(parts):  # the first split pass is quick, later ones wait (as for a descheduled thread)
        seen.append(parts)
        time.sleep(0.002 if len(seen) == 1 else 0.005 if parts < 2 else 0.02)
        return parts

    for _ in range(8):
        threads.run_small_pass(2, forward, 7, guard)
    one = threads.ONE_CORE_SPLIT  # on one thread, with the split's kernels
    assert seen == [2, 2, one, 2, 2, one, one, one]  # quick, slow (strike), compare, slower (strikes 2, 3): rest


def test_a_query_kept_on_one_thread_gives_the_split_numbers_bit_for_bit(minilm_dir):
    # with BLAS chosen for every row count, a pass on one thread would differ from the split in its last bits;
    # the guard's one-thread pass runs the split's tiles instead, so a query's vectors never depend on timing
    from bgesmall import threads

    model = bgesmall.load(minilm_dir, threads=2, plan="linear=blas,query=split")
    text = ["a passage long enough to take BLAS at every row count " * 12]
    threads.run_small_pass(2, lambda parts: parts)
    if not threads._split_state["usable"]:
        pytest.skip("numba has no OpenMP or TBB threading layer here: queries never split")
    split = model.embed(text)
    tokens = model.count_tokens(text)[0]
    model._split_guard._size(tokens).rest = 5  # as after two slow split passes
    kept = model.embed(text)
    assert model._split_guard._size(tokens).rest == 4  # that pass ran on one thread
    np.testing.assert_array_equal(kept, split)
    model._split_guard._size(tokens).rest = 0
    np.testing.assert_array_equal(model.embed(text), split)
