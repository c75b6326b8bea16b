"""The kernel plan (bgesmall/plan.py, bgesmall/tune.py): measured, kept, reused, forced, and never an error.

The vectors under every forced plan are held to the references in tests/test_parity.py
(test_every_plan_keeps_parity_and_batch_invariance); here: that the planner chooses by measurement, that a
forced candidate is the one that runs, and what happens to the plan file when things go wrong.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest

import bgesmall
from bgesmall import linear as linear_mod
from bgesmall import plan as plan_mod
from bgesmall import tune


def slowed(fn, times=4):
    """fn made slow on purpose, whatever the machine's speed: it runs, then waits `times` - 1 times as long again
    and 2 ms more (a factor alone is not enough: on AMD Zen 5, the tiles at 8 rows are over 4x BLAS's speed)."""
    def slow(*args):
        t = time.perf_counter()
        fn(*args)
        time.sleep((times - 1) * (time.perf_counter() - t) + 0.002)

    return slow


def used_implementations(plan) -> set[str]:
    return {name for choices in plan.linear.values() for _, name in choices}


def test_a_candidate_made_slow_is_not_chosen(minilm, monkeypatch):
    monkeypatch.setitem(linear_mod.IMPLEMENTATIONS, "blas", slowed(linear_mod.IMPLEMENTATIONS["blas"]))
    plan = tune.measure(minilm.config, minilm.weights, threads=1, budget_s=60)
    assert "blas" not in used_implementations(plan), plan.linear
    assert all(min(times.values()) < times["blas"] for key, times in plan.timings.items() if key.startswith("linear"))


def test_when_the_tiles_are_slow_the_planner_takes_another(minilm, monkeypatch):
    for name in ("tiles", "tiles/48"):
        monkeypatch.setitem(linear_mod.IMPLEMENTATIONS, name, slowed(linear_mod.IMPLEMENTATIONS[name]))
    plan = tune.measure(minilm.config, minilm.weights, threads=1, budget_s=60)
    assert used_implementations(plan) == {"blas"}, plan.linear


def _slowed_when_working(fn, rows: bool):
    # an attention kernel of heads of 32 made slow on purpose, when it has sequences to do (each is called for
    # every batch, to do nothing when the other takes them all)
    def slow(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out):
        t = time.perf_counter()
        fn(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out)
        if first_only or (lengths < blocks_from).any() if rows else (lengths >= blocks_from).any():
            time.sleep(3 * (time.perf_counter() - t) + 0.001)

    return slow


@pytest.mark.parametrize("slow", ["rows", "blocks"])
def test_a_slow_attention_kernel_is_not_chosen(minilm, monkeypatch, slow):
    import sys

    attention = sys.modules["bgesmall.kernels.attention"]
    name = f"attention_{slow}"
    monkeypatch.setattr(attention, name, _slowed_when_working(getattr(attention, name), slow == "rows"))
    plan = tune.measure(minilm.config, minilm.weights, threads=1, budget_s=60)
    measured = [n for n in plan_mod.BLOCK_LENGTHS if f"blocks at {n} tokens" in plan.timings]
    if slow == "blocks":  # the blocks lose at the longest length, measured first: a row at a time, and beyond
        assert measured == [plan_mod.BLOCK_LENGTHS[-1]], plan.timings.keys()
        assert plan.blocks_from == 2 * plan_mod.BLOCK_LENGTHS[-1], plan.describe()
    else:  # they win at every length, all measured: eight rows at a time from the shortest
        assert measured == list(plan_mod.BLOCK_LENGTHS), plan.timings.keys()
        assert plan.blocks_from == plan_mod.BLOCK_LENGTHS[0], plan.describe()


@pytest.mark.parametrize("spec, rows, blocks", [("long_sequence=513,blocks_from=1", False, True),
                                                ("long_sequence=513,blocks_from=513", True, False)])
def test_a_forced_blocks_from_is_the_one_that_runs(minilm_dir, monkeypatch, spec, rows, blocks):
    # the model's plan reaches the kernels: every sequence of a batch (none of them [CLS]-only) to the one forced
    import sys

    attention = sys.modules["bgesmall.kernels.attention"]
    work = {"rows": 0, "blocks": 0}

    def counting(name, fn):
        def run(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out):
            if not first_only:
                work[name] += int((lengths < blocks_from).sum() if name == "rows" else (lengths >= blocks_from).sum())
            return fn(qkv, qkv_b, starts, lengths, num_heads, first_only, blocks_from, out)

        return run

    for name in work:
        monkeypatch.setattr(attention, f"attention_{name}", counting(name, getattr(attention, f"attention_{name}")))
    model = bgesmall.load(minilm_dir, plan=spec, threads=1)
    model.embed(["a short text", "and another one, a little longer than the first, to be sure of it"])
    assert (work["rows"] > 0, work["blocks"] > 0) == (rows, blocks), work


def test_a_forced_candidate_is_the_one_that_runs(minilm_dir, monkeypatch):
    calls = {name: 0 for name in linear_mod.IMPLEMENTATIONS}

    def counting(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)

        return run

    for name, fn in list(linear_mod.IMPLEMENTATIONS.items()):
        monkeypatch.setitem(linear_mod.IMPLEMENTATIONS, name, counting(name, fn))
    model = bgesmall.load(minilm_dir, plan="linear=blas,query=single", threads=1)
    model.embed(["a short text", "and another one, a little longer than the first"])
    assert calls["blas"] == 4 * model.config.num_hidden_layers  # one pass (mean pooling): 4 products per layer
    assert calls["tiles"] == calls["tiles/48"] == 0
    assert all(lin.dense is not None for layer in model.weights.layers for lin in layer.linears())


def test_the_tiles_keep_no_second_copy_of_the_weights(minilm_dir):
    model = bgesmall.load(minilm_dir, plan="linear=tiles")
    assert all(lin.dense is None for layer in model.weights.layers for lin in layer.linears())


def test_forcing_through_the_environment(minilm_dir, monkeypatch):
    monkeypatch.setenv("BGESMALL_PLAN", "long_sequence=32,blocks_from=16,batch_tokens=2048")
    model = bgesmall.load(minilm_dir)
    assert (model.plan.long_sequence, model.plan.blocks_from, model.plan.batch_tokens) == (32, 16, 2048)
    assert model.plan.source.startswith("forced")


@pytest.mark.parametrize("spec, words", [
    ("linear=mkl", ["linear='mkl'", "tiles", "tiles/48", "blas"]),
    ("query=maybe", ["query='maybe'", "split", "single"]),
    ("kernels=fast", ["linear", "query", "long_sequence", "blocks_from", "batch_tokens"]),
    ("blocks_from=0", ["1..513"]),
    ("batch_tokens=lots", ["whole number"]),
    ("batch_tokens=1", ["16..65536"]),
])
def test_a_forced_candidate_that_does_not_exist_is_a_clear_error(minilm_dir, spec, words):
    with pytest.raises(ValueError) as e:
        bgesmall.load(minilm_dir, plan=spec)
    for w in words:
        assert w in str(e.value)


def test_the_first_load_measures_and_keeps_the_plan_the_next_reads_it(minilm_dir, plan_dir, monkeypatch):
    first = bgesmall.load(minilm_dir, threads=1)
    assert first.plan.source.startswith("measured")
    files = list(plan_dir.glob("plan-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["plan"]["source"].startswith("measured")

    def no_measuring(*a, **k):
        raise AssertionError("measured although a plan was kept")

    monkeypatch.setattr(tune, "measure", no_measuring)
    t = time.perf_counter()
    again = bgesmall.load(minilm_dir, threads=1)
    assert again.plan.source == "cached" and again.plan == plan_mod.replace(first.plan, source="cached")
    fp = plan_mod.fingerprint(again.config, 1)
    t = time.perf_counter()
    assert plan_mod.read_plan(fp) is not None
    assert time.perf_counter() - t < 0.05  # a kept plan is read in milliseconds


@pytest.mark.parametrize("content", ["{not json", json.dumps({"fingerprint": {}, "plan": {}}), "", "[1, 2]",
                                     "__stale__", "__bad_choice__", "__infinite__", "__string__", "__missing__"])
def test_a_corrupt_or_stale_plan_file_is_measured_again_with_one_line(minilm, plan_dir, content, capsys):
    fp = plan_mod.fingerprint(minilm.config, 1)
    path = plan_mod.plan_path(fp)
    path.parent.mkdir(parents=True)
    good = {"fingerprint": fp, "plan": plan_mod.default_plan(minilm.config).to_json()}
    if content == "__stale__":
        content = json.dumps(dict(good, fingerprint=dict(fp, numba="0.1")))
    elif content == "__bad_choice__":
        good["plan"]["linear"]["384x1152"] = [[1, "mkl"]]
        content = json.dumps(good)
    elif content in ("__infinite__", "__string__", "__missing__"):  # a hostile or hand-edited number
        if content == "__missing__":
            del good["plan"]["blocks_from"]
        else:
            good["plan"]["blocks_from"] = float("inf") if content == "__infinite__" else "28"
        content = json.dumps(good)
    path.write_text(content)
    plan = tune.plan_for(minilm.config, minilm.weights, 1)
    assert plan.source.startswith("measured")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measuring again" in err[0], err
    assert plan_mod.read_plan(fp) is not None  # rewritten, valid


def test_an_unwritable_plan_folder_keeps_the_plan_in_memory(minilm, plan_dir, monkeypatch, capsys):
    # a read-only folder, as a user who is not root meets it (root may write anywhere, so it is simulated)
    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(plan_mod.tempfile, "mkstemp", refused)
    plan = tune.plan_for(minilm.config, minilm.weights, 1)
    assert plan.source.startswith("measured")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot keep the measured plan" in err[0] and "Permission denied" in err[0], err
    assert "BGESMALL_PLAN_DIR" in err[0]


def test_a_plan_folder_that_cannot_be_made_keeps_the_plan_in_memory(minilm, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BGESMALL_PLAN_DIR", str(blocker / "plans"))  # works for root too: a file is in the way
    plan = tune.plan_for(minilm.config, minilm.weights, 1)
    assert plan.source.startswith("measured")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot keep the measured plan" in err[0]
    model = bgesmall.load(minilm.path, threads=1)
    assert model.embed(["still embeds"]).shape == (1, model.dim)


def test_two_processes_tuning_at_once_leave_one_valid_plan(minilm_dir, plan_dir):
    code = ("import bgesmall, sys; m = bgesmall.load(sys.argv[1], threads=1); "
            "assert m.plan.source.startswith(('measured', 'cached')); print(m.embed(['x'])[0, :3])")
    env = {**__import__("os").environ, "BGESMALL_PLAN_DIR": str(plan_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(minilm_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][1] == outs[1][1] == ""  # nothing said on stderr: no torn or corrupt file was ever read
    files = list(plan_dir.glob("plan-*.json"))
    assert len(files) == 1 and not list(plan_dir.glob(".plan-*"))  # no temporary left behind
    json.loads(files[0].read_text())


def test_measuring_stays_within_its_time_budget(bge_dir_for_plan):
    model = bgesmall.load(bge_dir_for_plan, plan="default")
    t = time.perf_counter()
    plan = tune.measure(model.config, model.weights, threads=model.threads)
    took = time.perf_counter() - t
    assert took < tune.BUDGET_S + 1.0, f"measuring took {took:.2f} s"
    assert plan.source.startswith("measured")


def test_a_tiny_budget_keeps_the_built_in_choices_and_says_so(minilm):
    plan = tune.measure(minilm.config, minilm.weights, threads=2, budget_s=0.0)
    assert "time limit reached" in plan.source and "attention blocks" in plan.source
    built_in = plan_mod.default_plan(minilm.config)
    assert (plan.linear, plan.blocks_from, plan.long_sequence) == (built_in.linear, built_in.blocks_from,
                                                                   built_in.long_sequence)


def test_a_failed_measurement_falls_back_to_the_built_in_plan(minilm, plan_dir, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("no timer")

    monkeypatch.setattr(tune, "measure", broken)
    plan = tune.plan_for(minilm.config, minilm.weights, 1)
    assert plan.source.startswith("default (measuring failed")
    assert "using the built-in plan" in capsys.readouterr().err


def test_lengths_are_measured_longest_first_until_the_threshold_is_settled(minilm, monkeypatch):
    # the second ("long") path is faster from 32 tokens on: 64, 48, 32 and 24 are measured, not 16 or 12, and
    # the threshold is the one that measuring every length gives
    lengths, routed = (12, 16, 24, 32, 48, 64), []
    table = {n: {"short": 1.0, "long": 0.5 if n >= 32 else 2.0} for n in lengths}
    monkeypatch.setattr(tune, "best_times", lambda runs, repeats, deadline, warm_up=True: table[routed[-1]])
    paths = {"short": lambda n: routed.append(n) or (plan_mod.NEVER, n + 1), "long": lambda n: (plan_mod.NEVER, n)}
    times = tune._time_paths(minilm.config, minilm.weights, np.random.default_rng(0), time.perf_counter() + 60,
                             lengths, paths)
    assert list(times) == [64, 48, 32, 24]
    assert tune._threshold(times, "short", "long", settled=None) == tune._threshold(table, "short", "long",
                                                                                   settled=None) == 32
    # a model with 40 positions: the lengths past them are passed over, not the end of the measuring
    short_model = dataclasses.replace(minilm.config, max_position_embeddings=40)
    times = tune._time_paths(short_model, minilm.weights, np.random.default_rng(0), time.perf_counter() + 60,
                             lengths, paths)
    assert list(times) == [32, 24]


def test_a_length_where_the_measuring_would_stop_is_timed_twice(minilm, monkeypatch):
    # one noisy round at 64 tokens says the long path lost; the second round, the best of both counting, says it
    # won: the measuring goes on, and the threshold is the one the steady timings give
    calls, routed = [], []

    def timed(runs, repeats, deadline, warm_up=True):
        n = routed[-1]
        calls.append(n)
        noisy = n == 64 and calls.count(64) == 1
        return {"short": 1.0, "long": 3.0 if noisy else (0.5 if n >= 32 else 2.0)}

    monkeypatch.setattr(tune, "best_times", timed)
    paths = {"short": lambda n: routed.append(n) or (plan_mod.NEVER, n + 1), "long": lambda n: (plan_mod.NEVER, n)}
    times = tune._time_paths(minilm.config, minilm.weights, np.random.default_rng(0), time.perf_counter() + 60,
                             (12, 16, 24, 32, 48, 64), paths)
    assert calls == [64, 64, 48, 32, 24, 24]  # a second round where a length loses, none where it wins
    assert tune._threshold(times, "short", "long", settled=None) == 32


def test_attention_threshold_from_measurements():
    t = lambda fused, blas: {"fused": fused, "blas": blas}  # noqa: E731
    assert tune._threshold({8: t(1, 2), 16: t(2, 1), 32: t(3, 1)}) == 16
    assert tune._threshold({8: t(1, 2), 16: t(2, 1), 32: t(1, 2), 64: t(3, 1)}) == 64
    assert tune._threshold({8: t(1, 2), 64: t(1, 2)}) == 128  # BLAS never won, measured to 64: from twice that
    assert tune._threshold({8: t(1, 2), 256: t(1, 2)}) == plan_mod.NEVER  # never, measured to 256: fused always
    assert tune._threshold({8: t(2, 1), 64: t(3, 1)}) == 8
    r = lambda rows, blocks: {"rows": rows, "blocks": blocks}  # noqa: E731
    assert tune._threshold({12: r(1, 2), 32: r(2, 1), 64: r(3, 1)}, "rows", "blocks", settled=None) == 32
    assert tune._threshold({12: r(1, 2), 64: r(1, 2)}, "rows", "blocks", settled=None) == 128  # never: twice 64
    assert tune._threshold({12: r(2, 1), 64: r(2, 1)}, "rows", "blocks", settled=None) == 12  # everywhere: the first


def test_plan_round_trips_through_json(minilm):
    plan = tune.measure(minilm.config, minilm.weights, threads=1, budget_s=0.5)
    again = plan_mod.Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan


@pytest.fixture(scope="module")
def bge_dir_for_plan(tmp_path_factory):
    from bgesmall import synthetic

    return synthetic.make_checkpoint(tmp_path_factory.mktemp("bge-plan"), seed=0)


def test_cli_tune_prints_each_candidate_and_keeps_the_plan(minilm_dir, plan_dir):
    r = subprocess.run([sys.executable, "-m", "bgesmall.cli", "tune", "--model", str(minilm_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "*tiles" in r.stdout or "*blas" in r.stdout or "*tiles/48" in r.stdout
    assert "attention at 256 tokens" in r.stdout and "kept in" in r.stdout  # the longest: measured first
    assert "blocks at 64 tokens" in r.stdout and ("*rows" in r.stdout or "*blocks" in r.stdout)
    assert len(list(plan_dir.glob("plan-*.json"))) == 1
    info = subprocess.run([sys.executable, "-m", "bgesmall.cli", "info", "--model", str(minilm_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)["plan"]
    assert described[0] == "source: cached" and any(line.startswith("attention") for line in described)


def test_cli_reports_a_forced_candidate_that_does_not_exist(minilm_dir):
    r = subprocess.run([sys.executable, "-m", "bgesmall.cli", "info", "--model", str(minilm_dir)],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "BGESMALL_PLAN": "linear=fast"})
    assert r.returncode == 1
    assert "linear='fast' does not exist" in r.stderr and "tiles/48" in r.stderr
    assert "Traceback" not in r.stderr


def test_blocked_tiles_are_bit_identical():
    from bgesmall.kernels import linear, pack_columns

    rng = np.random.default_rng(1)
    for m in (1, 47, 48, 49, 100, 130):
        x = rng.standard_normal((m, 384)).astype(np.float32)
        w = pack_columns(rng.standard_normal((384, 200)).astype(np.float32))
        a, b = np.empty((m, 200), np.float32), np.empty((m, 200), np.float32)
        linear(x, w, a, 0)
        linear(x, w, b, 48)
        np.testing.assert_array_equal(a, b)


def test_measuring_leaves_the_models_own_weights_as_they_were(minilm_dir):
    model = bgesmall.load(minilm_dir, plan="linear=tiles")
    before = [(lin.choices, lin.dense is None) for layer in model.weights.layers for lin in layer.linears()]
    tune.measure(model.config, model.weights, threads=1, budget_s=30)
    after = [(lin.choices, lin.dense is None) for layer in model.weights.layers for lin in layer.linears()]
    assert after == before
