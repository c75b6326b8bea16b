"""Parquet in and out, and resumable job folders: killed with SIGKILL at chosen points, then resumed, the output
is bit for bit that of a run never interrupted.

The model is all-MiniLM-L6-v2 (the `minilm` fixtures). Killed runs are subprocesses; the runs that finish are
in-process (cli.main), which is the same code without the start-up cost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# The parquet extra is part of the test extra: without it these tests fail at import, they are not skipped.
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bgesmall import cli, jobs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["cats sit on mats", "numba compiles loops", "parquet stores columns", "a resumable job", "ünïcödé 🙂"]


def text_of(i: int) -> str | None:
    return None if i % 11 == 3 else f"{i}: {WORDS[i % len(WORDS)]} " + "word " * (i % 9)


def write_docs(path: Path, ids: range, row_group_rows: int = 7) -> list:
    table = pa.table({"id": list(ids), "text": [text_of(i) for i in ids], "url": [f"https://x/{i}" for i in ids]})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return table


def vectors(table) -> np.ndarray:
    """[n, dim] float32; a null embedding's row as NaN (what the file holds under a null is unspecified)."""
    col = table.column("embedding").combine_chunks()
    out = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).copy()
    out[col.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def embed(args, minilm_dir) -> int:
    return cli.main(["embed", "--model", str(minilm_dir), "-q", *map(str, args)])


# ---- one Parquet file ----


def test_parquet_round_trip_keeps_ids_order_and_nulls(tmp_path, minilm_dir, minilm, capsys):
    docs = write_docs(tmp_path / "docs.parquet", range(30))
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "v.parquet", "--batch-size", "8"], minilm_dir) == 0
    assert "3 row(s) without a text got a null embedding" in capsys.readouterr().err
    out = pq.read_table(tmp_path / "v.parquet")
    assert out.column_names == ["id", "text", "url", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert out.column("id").to_pylist() == list(range(30)) and out.column("url").equals(docs.column("url"))
    emb = out.column("embedding")
    assert [i for i, v in enumerate(emb.to_pylist()) if v is None] == [3, 14, 25]
    texts = [t for t in docs.column("text").to_pylist() if t is not None]
    got = vectors(out)[[t is not None for t in docs.column("text").to_pylist()]]
    np.testing.assert_allclose(got, minilm.embed(texts), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.parquet", "v.parquet"]  # no temporary left


def test_keep_query_and_strict(tmp_path, minilm_dir, minilm, capsys):
    write_docs(tmp_path / "docs.parquet", range(12))
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "q.parquet", "--keep", "id", "--query"],
                 minilm_dir) == 0
    out = pq.read_table(tmp_path / "q.parquet")
    assert out.column_names == ["id", "embedding"]
    np.testing.assert_allclose(vectors(out)[:3], minilm.embed_queries([text_of(i) for i in range(3)]), atol=1e-6)
    capsys.readouterr()
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "s.parquet", "--strict"], minilm_dir) == 1
    err = capsys.readouterr().err
    assert "docs.parquet row 3: no text in 'text'" in err and "--strict" in err
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / ".s.parquet.part").exists()
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "k.parquet", "--keep", "id,nope"], minilm_dir) == 1
    assert "no column 'nope'" in capsys.readouterr().err


def test_txt_and_jsonl_to_parquet(tmp_path, minilm_dir, minilm):
    lines = ["first line", "", "third 🙂"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert embed(["-i", tmp_path / "in.txt", "-o", tmp_path / "t.parquet"], minilm_dir) == 0
    out = pq.read_table(tmp_path / "t.parquet")
    assert out.column("text").to_pylist() == lines
    np.testing.assert_allclose(vectors(out), minilm.embed(lines), atol=1e-6)

    records = [{"id": "a", "body": "one"}, {"id": "b", "body": 7}, {"id": "c"}, {"id": "d", "body": "four"}]
    (tmp_path / "in.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n", encoding="utf-8")
    assert embed(["-i", tmp_path / "in.jsonl", "--field", "body", "-o", tmp_path / "j.parquet"], minilm_dir) == 0
    out = pq.read_table(tmp_path / "j.parquet")
    assert out.column("id").to_pylist() == ["a", "b", "c", "d"]
    emb = out.column("embedding").to_pylist()
    assert emb[1] is None and emb[2] is None  # a number, and no field: null embeddings
    np.testing.assert_allclose(np.array([emb[0], emb[3]], np.float32), minilm.embed(["one", "four"]), atol=1e-6)


def test_folder_and_glob_inputs_in_file_order(tmp_path, minilm_dir):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write_docs(tmp_path / "in" / "a.parquet", range(0, 9))
    write_docs(tmp_path / "in" / "b.parquet", range(9, 20))
    write_docs(tmp_path / "in" / "sub" / "c.parquet", range(20, 25))
    assert embed(["-i", tmp_path / "in", "-o", tmp_path / "all.parquet"], minilm_dir) == 0
    assert pq.read_table(tmp_path / "all.parquet").column("id").to_pylist() == list(range(25))
    assert embed(["-i", str(tmp_path / "in" / "*.parquet"), "-o", tmp_path / "top"], minilm_dir) == 0
    assert jobs.read_job(tmp_path / "top").column("id").to_pylist() == list(range(20))


def test_bad_inputs_exit_1_with_the_reason(tmp_path, minilm_dir, capsys):
    write_docs(tmp_path / "docs.parquet", range(5))
    assert embed(["-i", tmp_path / "docs.parquet", "--field", "body", "-o", tmp_path / "v.parquet"], minilm_dir) == 1
    assert "has no column 'body' (its columns: id, text, url)" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert embed(["-i", tmp_path / "bad.parquet", "-o", tmp_path / "v.parquet"], minilm_dir) == 1
    assert "not a readable Parquet file" in capsys.readouterr().err
    assert embed(["-i", str(tmp_path / "none*.parquet"), "-o", tmp_path / "v.parquet"], minilm_dir) == 1
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "other"], minilm_dir) == 1
    assert "holds files that are not this job's (notes.txt)" in capsys.readouterr().err
    assert not (tmp_path / "v.parquet").exists()


# ---- resumable job folders ----

# Run in a subprocess: the job, killed by itself with SIGKILL at a chosen point. The hooks wrap the real functions.
KILLED_RUN = r"""
import os, signal, sys
from bgesmall import cli, model, parquet_io
point, shard = sys.argv[1], int(sys.argv[2])
name = f"part-{shard:06d}.parquet"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "before-any-shard":  # the manifest is written, the first shard not begun
    real_embed = model.Model.embed
    model.Model.embed = lambda self, *a, **k: die()
elif point == "mid-shard-write":  # the shard's bytes are in its temporary file, not yet synced or renamed
    real_fsync = os.fsync
    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".{name}.part"):
            die()
        real_fsync(fd)
    os.fsync = fsync
elif point == "between-shards":  # the shard renamed, the manifest not yet updated
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(name):
            die()
    os.replace = replace
sys.exit(cli.main(sys.argv[3:]))
"""


def job_args(minilm_dir, src: Path, out: Path) -> list[str]:
    return ["embed", "--model", str(minilm_dir), "-q", "-i", str(src), "-o", str(out), "--shard-rows", "12",
            "--batch-size", "5"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def killed(point: str, shard: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, point, str(shard), *args], capture_output=True, cwd=cwd,
                       env=env(), timeout=180)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr.decode())
    return r


def assert_only_whole_files(folder: Path) -> None:
    for p in folder.iterdir():
        if jobs.SHARD_RE.match(p.name):
            pq.read_table(p)  # a final name always holds a whole file
        elif p.name == jobs.MANIFEST:
            json.loads(p.read_text())


def test_job_killed_at_several_points_then_resumed_equals_an_uninterrupted_run(tmp_path, minilm_dir):
    src = tmp_path / "docs.parquet"
    docs = write_docs(src, range(100))
    assert cli.main(job_args(minilm_dir, src, tmp_path / "whole")) == 0
    whole = jobs.read_job(tmp_path / "whole")

    out = tmp_path / "resumed"
    args = job_args(minilm_dir, src, out)
    killed("before-any-shard", 0, args, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [jobs.MANIFEST]
    killed("mid-shard-write", 1, args, tmp_path)
    assert {p.name for p in out.iterdir()} == {jobs.MANIFEST, "part-000000.parquet", ".part-000001.parquet.part"}
    assert_only_whole_files(out)
    killed("between-shards", 3, args, tmp_path)
    assert_only_whole_files(out)
    assert [s["file"] for s in json.loads((out / jobs.MANIFEST).read_text())["shards"]] == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]  # shard 3 is found by its file

    # from outside, at whatever point the job has reached after one more shard
    proc = subprocess.Popen([sys.executable, "-m", "bgesmall.cli", *args], cwd=tmp_path, env=env(),
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "part-000004.parquet").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert_only_whole_files(out)

    assert cli.main(args) == 0
    resumed = jobs.read_job(out)
    assert resumed.column("id").to_pylist() == list(range(100))
    assert resumed.drop_columns(["embedding"]).equals(docs)
    assert np.array_equal(vectors(resumed), vectors(whole), equal_nan=True)  # bit for bit
    assert resumed.column("embedding").null_count == whole.column("embedding").null_count == 9
    manifest = json.loads((out / jobs.MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == 100 and manifest["null_rows"] == 9
    assert [s["rows"] for s in manifest["shards"]] == [12] * 8 + [4]
    assert manifest["job"]["precision"] == "fp32" and manifest["job"]["model"]["fingerprint"]
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_changed_input_is_refused_until_overwrite(tmp_path, minilm_dir, capsys):
    src = tmp_path / "docs.parquet"
    write_docs(src, range(30))
    out = tmp_path / "job"
    args = job_args(minilm_dir, src, out)
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # complete: nothing to do
    assert "30 done by an earlier run" in capsys.readouterr().err
    write_docs(src, range(31))
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "the input changed (docs.parquet changed size" in err and "--overwrite" in err
    assert cli.main([*args, "--query"]) == 1
    assert "--query changed (False -> True)" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0
    assert jobs.read_job(out).num_rows == 31


def test_full_disk_keeps_complete_shards_and_a_rerun_finishes(tmp_path, minilm_dir, monkeypatch, capsys):
    src = tmp_path / "docs.parquet"
    write_docs(src, range(40))
    out = tmp_path / "job"
    real = pq.write_table
    calls = []

    def full_on_the_third(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError(28, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_on_the_third)
    assert cli.main(job_args(minilm_dir, src, out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the 2 complete shard(s) are kept" in err
    assert sorted(p.name for p in out.iterdir()) == [jobs.MANIFEST, "part-000000.parquet", "part-000001.parquet"]
    monkeypatch.setattr(pq, "write_table", real)
    assert cli.main(job_args(minilm_dir, src, out)) == 0
    assert jobs.read_job(out).column("id").to_pylist() == list(range(40))


def test_empty_input_gives_one_empty_shard(tmp_path, minilm_dir):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert embed(["-i", tmp_path / "empty.txt", "-o", tmp_path / "job"], minilm_dir) == 0
    table = jobs.read_job(tmp_path / "job")
    assert table.num_rows == 0 and table.column_names == ["text", "embedding"]


def test_progress_counts_resumed_rows_in_the_total_not_in_the_rate():
    import io

    from bgesmall.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = Progress(1000, stream=out, unit="rows", initial=400)
    bar.start -= 10.0  # as if 10 s had passed since the start and the last line
    bar._last -= 10.0
    bar.update(100)
    line = out.getvalue().strip()
    assert line.startswith("500/1000 rows") and "10.0 rows/s" in line and "ETA 0:50" in line


def test_jsonl_records_whose_types_drift_between_shards(tmp_path, minilm_dir, capsys):
    numbers_then_nulls = [{"text": f"t{i}", "n": i if i < 12 else None} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, numbers_then_nulls)) + "\n", encoding="utf-8")
    assert cli.main(job_args(minilm_dir, tmp_path / "a.jsonl", tmp_path / "a")) == 0
    assert jobs.read_job(tmp_path / "a").column("n").to_pylist() == list(range(12)) + [None] * 18
    nulls_then_words = [{"text": f"t{i}", "n": None if i < 12 else "word"} for i in range(30)]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, nulls_then_words)) + "\n", encoding="utf-8")
    assert cli.main(job_args(minilm_dir, tmp_path / "b.jsonl", tmp_path / "b")) == 1
    assert "column 'n' is string from row 12 on, but null before" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [jobs.MANIFEST, "part-000000.parquet"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_precision_that_is_not_a_tier_is_a_one_line_usage_error(tmp_path, minilm_dir, capsys):
    write_docs(tmp_path / "docs.parquet", range(10))
    job = tmp_path / "job"
    r = subprocess.run([sys.executable, "-m", "bgesmall.cli", "embed", "--model", str(minilm_dir), "-i",
                        str(tmp_path / "docs.parquet"), "-o", str(job), "--precision", "int8"],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("bgesmall embed: precision 'int8' is not a tier")
    assert "valid values are 'fp32', 'bf16'" in r.stderr
    assert embed(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "v.parquet", "--precision", "fp16"],
                 minilm_dir) == 2
    assert "precision 'fp16'" in capsys.readouterr().err
    assert not job.exists() and not (tmp_path / "v.parquet").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"precision 'fp16' is not a tier.*'fp32', 'bf16'"):
        jobs.JobSettings(precision="fp16")
    assert jobs.JobSettings(precision="BF16").precision == "bf16" and jobs.JobSettings().precision is None


def test_a_bf16_job_records_its_tier_resumes_bit_for_bit_and_refuses_another(tmp_path, minilm_dir, minilm,
                                                                             monkeypatch, capsys):
    """The manifest records the tier that runs; a resumed bf16 job equals an uninterrupted one bit for bit; the
    same folder is refused to a job of the other tier."""
    from bgesmall.kernels.matmul import HAS_BF16

    tier = "bf16" if HAS_BF16 else "fp32"  # what bf16 runs on this CPU
    src = tmp_path / "docs.parquet"
    docs = write_docs(src, range(40))
    whole = tmp_path / "whole"
    assert cli.main([*job_args(minilm_dir, src, whole), "--precision", "BF16"]) == 0
    assert json.loads((whole / jobs.MANIFEST).read_text())["job"]["precision"] == tier
    texts = [t for t in docs.column("text").to_pylist() if t is not None]
    got = vectors(jobs.read_job(whole))[[t is not None for t in docs.column("text").to_pylist()]]
    assert cosines(got, minilm.embed(texts)).min() >= 0.9995
    if HAS_BF16:
        assert not np.array_equal(got, minilm.embed(texts)), "bf16 ran the exact tier"

    out = tmp_path / "resumed"
    real = pq.write_table
    calls = []

    def full_on_the_third(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_on_the_third)
    assert cli.main([*job_args(minilm_dir, src, out), "--precision", "bf16"]) == 1
    monkeypatch.setattr(pq, "write_table", real)
    capsys.readouterr()
    assert cli.main(job_args(minilm_dir, src, out)) == 1  # fp32 (the default) on a bf16 folder
    err = capsys.readouterr().err
    if HAS_BF16:
        assert "precision changed ('bf16' -> 'fp32')" in err and "--overwrite" in err and err.count("\n") == 1
    monkeypatch.setenv("BGESMALL_PRECISION", "bf16")  # the environment's default is the job's tier: it goes on
    assert cli.main(job_args(minilm_dir, src, out)) == 0
    assert "24 done by an earlier run" in capsys.readouterr().err
    assert np.array_equal(vectors(jobs.read_job(out)), vectors(jobs.read_job(whole)), equal_nan=True)
    assert json.loads((out / jobs.MANIFEST).read_text())["job"]["precision"] == tier


def test_bf16_asked_for_where_it_cannot_run_is_recorded_as_fp32(tmp_path, minilm_dir, monkeypatch, capsys):
    import bgesmall.kernels.matmul as matmul
    from bgesmall import precision as tiers

    src = tmp_path / "docs.parquet"
    write_docs(src, range(30))
    out = tmp_path / "job"
    monkeypatch.setattr(matmul, "HAS_BF16", False)  # a CPU without AVX512_BF16
    monkeypatch.setattr(tiers, "_warned", False)
    assert cli.main([*job_args(minilm_dir, src, out), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "bgesmall embed: precision 'bf16' needs a CPU with AVX512_BF16" in err and "Traceback" not in err
    manifest = json.loads((out / jobs.MANIFEST).read_text())
    assert manifest["complete"] and manifest["job"]["precision"] == "fp32"  # what ran
    assert cli.main([*job_args(minilm_dir, src, out), "--precision", "fp32"]) == 0  # the same tier: complete
    monkeypatch.setattr(matmul, "HAS_BF16", True)  # the folder moved to a CPU that runs bf16
    if matmul.has_avx512_bf16():
        assert cli.main([*job_args(minilm_dir, src, out), "--precision", "bf16"]) == 1
        assert "precision changed ('fp32' -> 'bf16')" in capsys.readouterr().err


def test_run_job_refuses_settings_of_another_tier_than_its_model(minilm, tmp_path):
    # from Python, the model is loaded by the caller: settings naming another tier are a mistake, said at once
    from bgesmall.jobs import JobSettings, run_job
    from bgesmall.kernels.matmul import HAS_BF16

    if not HAS_BF16:
        pytest.skip("this CPU has no AVX512_BF16: a bf16 request runs fp32 here, so an fp32 model matches it")
    with pytest.raises(ValueError, match=r"settings.precision is 'bf16' but the model runs 'fp32'"):
        run_job(minilm, None, tmp_path / "job", None, JobSettings(precision="bf16"))
    assert not (tmp_path / "job").exists()
