"""The kept weights file (bgesmall/packed.py): written by the first load of a weights file, mapped by the next,
and, whatever state it is found in, never the cause of a wrong vector or an error."""

from __future__ import annotations

import json
import mmap
import shutil
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


def test_a_layer_whose_plain_matrix_was_not_kept_reads_it_from_the_model_file(minilm_dir, plan_dir, reference):
    bgesmall.load(minilm_dir, plan="linear=tiles", threads=1)  # keeps panels only
    model = bgesmall.load(minilm_dir, plan="linear=blas", threads=1)
    lin = model.weights.layers[0].ffn_in_w
    assert mapped(lin.panels) and lin.dense is not None and not mapped(lin.dense)
    assert np.array_equal(model.embed(TEXTS), reference["linear=blas"])


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "garbage header":
        raw[:64] = b"\xff" * 64
    elif how == "another key":
        end = raw.index(b"\0")
        meta = json.loads(raw[len(packed.MAGIC):end])
        meta["key"]["size"] += 1
        raw[:packed.HEADER] = (packed.MAGIC + json.dumps(meta).encode()).ljust(packed.HEADER, b"\0")
    elif how == "other shapes":
        end = raw.index(b"\0")
        meta = json.loads(raw[len(packed.MAGIC):end])
        meta["arrays"][0][1] = [1, 1]
        raw[:packed.HEADER] = (packed.MAGIC + json.dumps(meta).encode()).ljust(packed.HEADER, b"\0")
    elif how == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "garbage header", "another key", "other shapes", "empty"])
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
