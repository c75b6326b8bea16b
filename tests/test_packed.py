"""The kept weights file (bgesmall/packed.py): written by the first load of a weights file, mapped by the next,
and, whatever state it is found in, never the cause of a wrong vector or an error."""

from __future__ import annotations

import io
import json
import mmap
import shutil
import struct
import tempfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bgesmall
from bgesmall import packed
from bgesmall.synthetic import make_checkpoint

TEXTS = ["a short text", "and another one, a little longer than the first, to make a second row"]


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """MiniLM's vectors loaded without the kept file, under each plan used below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BGESMALL_PACKED", "0")
        return {plan: bgesmall.load(minilm_dir, plan=plan, threads=1).embed(TEXTS)
                for plan in ("linear=blas", "linear=tiles")}


def mapped(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def kept_files(d):
    packed.finish()  # a load writes its file in the background
    return sorted(d.glob("weights-*.f32"))


def test_the_first_load_keeps_the_arrays_and_the_next_maps_them(minilm_dir, plan_dir, reference, capsys):
    first = bgesmall.load(minilm_dir, plan="linear=blas", threads=1)
    assert not mapped(first.weights.layers[0].qkv_w.panels)  # packed in memory, then kept
    files = kept_files(plan_dir)
    assert len(files) == 1 and not list(plan_dir.glob(".weights-*"))
    again = bgesmall.load(minilm_dir, plan="linear=blas", threads=1)
    lin = again.weights.layers[0].qkv_w
    assert mapped(lin.panels) and mapped(lin.dense) and mapped(again.weights.embeddings.word)
    assert lin.dense.flags.f_contiguous  # BLAS reads the [out, in] matrix as it is, transposed: no copy
    assert np.array_equal(first.embed(TEXTS), reference["linear=blas"])
    assert np.array_equal(again.embed(TEXTS), reference["linear=blas"])
    tiles = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # the same file serves another plan
    assert mapped(tiles.weights.layers[0].qkv_w.panels) and tiles.weights.layers[0].qkv_w.dense is None
    assert np.array_equal(tiles.embed(TEXTS), reference["linear=tiles"])
    assert capsys.readouterr().err == ""


def test_the_kept_file_is_written_in_the_background_and_a_load_of_it_waits(minilm_dir, plan_dir, reference, monkeypatch):
    import threading

    release, real = threading.Event(), packed.write

    def held(*args, **kwargs):  # the disk, slow: the write waits for the test's word
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(packed, "write", held)
    first = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # returns, its file not yet written
    assert not list(plan_dir.glob("weights-*.f32"))
    assert np.array_equal(first.embed(TEXTS), reference["linear=tiles"])  # and embeds meanwhile
    threading.Timer(0.3, release.set).start()
    again = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # waits for this process's write, then maps it
    assert mapped(again.weights.layers[0].qkv_w.panels)
    assert np.array_equal(again.embed(TEXTS), reference["linear=tiles"])


def test_a_layer_whose_plain_matrix_was_not_kept_reads_it_from_the_model_file(minilm_dir, plan_dir, reference):
    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # keeps panels only
    model = bgesmall.load(minilm_dir, plan="linear=blas", threads=1)
    lin = model.weights.layers[0].ffn_in_w
    assert mapped(lin.panels) and lin.dense is not None and not mapped(lin.dense)
    assert np.array_equal(model.embed(TEXTS), reference["linear=blas"])


def _rewrite_header(raw: bytearray, change) -> None:
    meta, size = packed._read_meta(io.BytesIO(bytes(raw)))
    change(meta)
    head = packed.MAGIC + struct.pack("<Q", size) + json.dumps(meta).encode()
    raw[:size] = head.ljust(size, b"\0")


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "garbage header":
        raw[:64] = b"\xff" * 64
    elif how == "header size garbage":
        raw[len(packed.MAGIC):len(packed.MAGIC) + 8] = struct.pack("<Q", 1 << 62)
    elif how == "another key":
        _rewrite_header(raw, lambda meta: meta["key"].update(size=meta["key"]["size"] + 1))
    elif how == "other shapes":
        _rewrite_header(raw, lambda meta: meta["arrays"][0].__setitem__(1, [1, 1]))
    elif how == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "garbage header", "header size garbage", "another key", "other shapes", "empty"])
def test_a_damaged_kept_file_is_ignored_with_one_line_and_written_again(minilm_dir, plan_dir, reference, how, capsys):
    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)
    (path,) = kept_files(plan_dir)
    _damage(path, how)
    model = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring the kept weights" in err[0], err
    assert not mapped(model.weights.layers[0].qkv_w.panels)
    assert np.array_equal(model.embed(TEXTS), reference["linear=tiles"])
    again = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # written again, whole
    assert mapped(again.weights.layers[0].qkv_w.panels) and capsys.readouterr().err == ""


def test_a_changed_weights_file_gets_its_own_arrays_and_the_old_ones_go(minilm_dir, plan_dir, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(minilm_dir, folder)
    first = bgesmall.load(folder, plan="linear=tiles", threads=1).embed(TEXTS)
    (old,) = kept_files(plan_dir)
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("layer.0.intermediate.dense.weight"))
    tensors[name] = tensors[name] * np.float32(1.5)
    save_file(tensors, folder / "model.safetensors")  # rewritten in place, same size
    changed = bgesmall.load(folder, plan="linear=tiles", threads=1).embed(TEXTS)
    (new,) = kept_files(plan_dir)  # the earlier file of this path is gone
    assert new != old
    monkeypatch.setenv("BGESMALL_PACKED", "0")
    assert np.array_equal(changed, bgesmall.load(folder, plan="linear=tiles", threads=1).embed(TEXTS))
    assert not np.allclose(changed, first, atol=1e-4)


def test_a_folder_that_cannot_be_written_leaves_the_arrays_in_memory(minilm_dir, plan_dir, reference, monkeypatch, capsys):
    def refused(*a, **k):  # a read-only folder, as a user who is not root meets it
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    model = bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)
    packed.finish()  # the write, in the background, fails with its line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot keep the packed weights" in err[0] and "BGESMALL_PLAN_DIR" in err[0], err
    assert np.array_equal(model.embed(TEXTS), reference["linear=tiles"])
    assert kept_files(plan_dir) == []


def test_turned_off_and_small_models_keep_nothing(minilm_dir, plan_dir, tmp_path, monkeypatch):
    tiny = make_checkpoint(tmp_path / "tiny", preset="tiny", seed=3)
    bgesmall.load(tiny, plan="default", threads=1)
    monkeypatch.setenv("BGESMALL_PACKED", "0")
    bgesmall.load(minilm_dir, plan="default", threads=1)
    assert kept_files(plan_dir) == []


def test_blas_reads_one_layout_whichever_way_its_matrix_came(minilm_dir, plan_dir):
    # from the model file (as the source's transpose) or rebuilt from the panels (the planner, a first load that
    # measures): the same Fortran-ordered [in, out], so one row's BLAS product has the same last bits either way
    from bgesmall.linear import Linear

    w = np.random.default_rng(0).standard_normal((1152, 384)).astype(np.float32)
    a, b = Linear.from_torch(w, ((1, "blas"),)), Linear.from_torch(w)
    b.prepare(((1, "blas"),))
    assert a.dense.flags.f_contiguous and b.dense.flags.f_contiguous
    x = np.random.default_rng(1).standard_normal((1, 384)).astype(np.float32)
    assert np.array_equal(x @ a.dense, x @ b.dense) and np.array_equal(a.dense, w.T) and np.array_equal(b.dense, w.T)


def test_writing_sweeps_kept_files_of_weights_that_are_gone_and_old_temporaries(minilm_dir, plan_dir, tmp_path):
    import os
    import time

    gone = tmp_path / "gone"
    shutil.copytree(minilm_dir, gone)
    bgesmall.load(gone, plan="linear=tiles", threads=1)
    (orphan,) = kept_files(plan_dir)
    shutil.rmtree(gone)  # the model folder deleted: its kept file is now an orphan
    stale_tmp, fresh_tmp = plan_dir / ".weights-old.tmp", plan_dir / ".weights-new.tmp"
    stale_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"x")  # possibly another process writing right now: left alone
    os.utime(stale_tmp, (time.time() - 7200, time.time() - 7200))
    foreign = plan_dir / "weights-not-ours.f32"
    foreign.write_bytes(b"something else")
    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # writes its own kept file, sweeping
    packed.finish()
    assert not orphan.exists() and not stale_tmp.exists()
    assert fresh_tmp.exists() and foreign.exists() and len(kept_files(plan_dir)) == 2


def test_a_long_header_grows_instead_of_failing(plan_dir, tmp_path):
    # a 24-layer model with BLAS on every layer: a header over 4096 bytes (bge-small's is 2-3 KB)
    from bgesmall.config import BertConfig

    cfg = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=8)
    names = [n for n, _ in packed.expected(cfg, list(range(4 * 24)))]
    shapes = dict(packed.expected(cfg, list(range(4 * 24))))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    k = packed.key(weights, {"h": "x" * 3000})
    k["path"] = str(tmp_path / ("long-folder-name-" * 20) / "model.safetensors")
    arrays = {n: np.full(shapes[n], i, np.float32) for i, n in enumerate(names)}
    path = packed.write(k, arrays)
    assert path is not None and packed._read_meta(open(path, "rb"))[1] > 4096
    back = packed.read(k, cfg)
    assert back is not None and all(np.array_equal(back[n], arrays[n]) for n in names)


def test_a_first_load_that_measures_keeps_the_matrices_its_plan_runs_through_blas(minilm_dir, plan_dir, monkeypatch):
    # the plan is measured after the weights are read: the kept file is written after it, with BLAS's matrices
    from dataclasses import replace

    from bgesmall import plan as plan_mod
    from bgesmall import tune

    monkeypatch.setattr(tune, "measure", lambda cfg, weights, threads: replace(
        plan_mod.parse_forced("linear=blas", cfg), source="measured (stand-in)"))
    first = bgesmall.load(minilm_dir, threads=1)
    assert first.plan.source.startswith("measured")
    again = bgesmall.load(minilm_dir, threads=1)  # the kept plan, and the kept file with every plain matrix
    assert again.plan.source == "cached"
    lins = [lin for layer in again.weights.layers for lin in layer.linears()]
    assert all(mapped(lin.panels) and mapped(lin.dense) for lin in lins)
    assert np.array_equal(first.embed(TEXTS), again.embed(TEXTS))


def test_writing_sweeps_kept_files_an_earlier_layout_wrote(minilm_dir, plan_dir):
    # a kept file of an older VERSION whose weights file is unchanged would otherwise stay on disk for good
    import json
    import struct

    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)
    (current,) = kept_files(plan_dir)
    with open(current, "rb") as fh:
        meta, size = packed._read_meta(fh)
    meta["key"]["version"] = packed.VERSION - 1
    old = plan_dir / "weights-0000000000000000-1111111111111111.f32"
    body = json.dumps(meta).encode()
    old.write_bytes((packed.MAGIC + struct.pack("<Q", size) + body).ljust(size, b"\0"))
    current.unlink()  # the next load writes its kept file again, and sweeps
    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)
    assert len(kept_files(plan_dir)) == 1 and not old.exists()  # kept_files: once the write is done
