"""bgesmall.ray on a local Ray (2 CPUs) and on a two-node cluster on this machine; one actor killed mid-job.

Slow (Ray starts its processes: ~15-30 s per cluster): marked `ray`; `pytest -m "not ray"` leaves them out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

# The ray extra is part of the test extra: without it these tests fail at import, they are not skipped.
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402, F401

from bgesmall import cli, jobs  # noqa: E402
from bgesmall import ray as bray  # noqa: E402
from test_jobs import assert_only_whole_files, env, killed, vectors  # the one-machine job's kill harness

pytestmark = pytest.mark.ray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


def docs(n: int):
    texts = [None if i % 13 == 5 else f"passage {i} about " + "ray data " * (i % 7) for i in range(n)]
    return pa.table({"id": list(range(n)), "text": texts})


def check(out, table, minilm, rows: int) -> None:
    """Every input row exactly once, its vector equal to Model.embed's, nulls where there was no text."""
    out = out.sort_by("id")
    assert out.column("id").to_pylist() == list(range(rows))
    emb = out.column("embedding").to_pylist()
    texts = table.column("text").to_pylist()
    assert [i for i, v in enumerate(emb) if v is None] == [i for i, t in enumerate(texts) if t is None]
    present = [i for i, t in enumerate(texts) if t is not None]
    np.testing.assert_allclose(np.array([emb[i] for i in present], np.float32),
                               minilm.embed([texts[i] for i in present]), atol=1e-6)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


class PidRecordingEmbedder(bray.Embedder):
    """The real Embedder, slowed down a little, telling the test its process id at every batch."""

    def __init__(self, pid_file: str, **kwargs):
        super().__init__(**kwargs)
        self.pid_file = pid_file

    def __call__(self, table):
        with open(self.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.2)
        return super().__call__(table)


def test_embed_dataset_locally_keeps_ids_and_matches_the_model(local_ray, minilm_dir, minilm):
    table = docs(90)
    ds = bray.embed_dataset(ray.data.from_arrow(table), column="text", model=minilm_dir, batch_size=16)
    check(pa.concat_tables(ray.get(ds.to_arrow_refs())), table, minilm, 90)


def test_an_actor_killed_mid_job_is_restarted_and_every_row_comes_out_once(local_ray, tmp_path, minilm_dir, minilm):
    table = docs(200)
    pid_file = tmp_path / "pids"
    pid_file.touch()
    bundle = bray.ModelBundle.from_folder(minilm_dir)
    ds = ray.data.from_arrow(table).repartition(20).map_batches(
        PidRecordingEmbedder, fn_constructor_kwargs={"pid_file": str(pid_file), "model": bundle, "threads": 1},
        batch_size=10, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    killed = []

    def kill_after_a_few_batches():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = pid_file.read_text().split()
            if len(pids) >= 3:
                os.kill(int(pids[-1]), signal.SIGKILL)
                killed.append(int(pids[-1]))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_a_few_batches)
    killer.start()
    out = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    killer.join()
    assert killed, "the job ended before an actor could be killed"
    pids = pid_file.read_text().split()
    assert len(set(pids)) >= 2 and int(pids[-1]) != killed[0]  # a new actor took over
    check(out, table, minilm, 200)


class Outside(threading.Thread):
    """Kills, with SIGKILL, the first of `pids()` once `ready()` holds; records what it killed and how many of
    `folder`'s shards were complete by then."""

    def __init__(self, pids, ready, folder):
        super().__init__()
        self.pids, self.ready, self.folder, self.killed, self.shards_then = pids, ready, folder, None, None

    def run(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.killed is None:
            if self.ready() and self.pids():
                self.killed = self.pids()[0]
                os.kill(self.killed, signal.SIGKILL)
                self.shards_then = len([p for p in self.folder.iterdir() if jobs.SHARD_RE.match(p.name)])
            time.sleep(0.005)


def test_cli_ray_job_killed_and_resumed_equals_an_uninterrupted_run(local_ray, tmp_path, minilm_dir, minilm,
                                                                     capsys):
    """The Ray job is a resumable job folder: its driver killed (SIGKILL) during a shard's write and from outside,
    its actor killed while resuming; the output holds every row once, in order, bit for bit an uninterrupted run's."""
    rows, shards = 96, 16
    texts = [None if i % 13 == 5 else f"passage {i}: " + "ray data embeds a corpus " * (6 + i % 5) for i in range(rows)]
    table = pa.table({"id": list(range(rows)), "text": texts})
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 40), tmp_path / "in" / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(40), tmp_path / "in" / "b.parquet", row_group_size=7)
    src = str(tmp_path / "in" / "*.parquet")
    opts, settings = bray.EmbedOptions(), jobs.JobSettings(shard_rows=6, batch_size=4)

    def args(out, *more):  # the CLI: a driver of its own on the fixture's cluster, or this process's Ray
        return ["embed", "--ray", *more, "--model", str(minilm_dir), "-q", "-i", src, "-o", str(out),
                "--shard-rows", "6", "--batch-size", "4"]

    assert cli.main(args(tmp_path / "whole")) == 0
    assert f"{rows} embeddings on Ray in {shards} shard(s)" in capsys.readouterr().err
    whole = jobs.read_job(tmp_path / "whole")
    assert whole.column("id").to_pylist() == list(range(rows))  # in input order
    check(whole, table, minilm, rows)

    out = tmp_path / "resumed"
    driver_args = args(out, ray.get_runtime_context().gcs_address)
    killed("mid-shard-write", 3, driver_args, tmp_path)  # shard 3's bytes in its temporary file, not yet renamed
    assert {p.name for p in out.iterdir()} == {jobs.MANIFEST, ".part-000003.parquet.part",
                                               *(f"part-00000{i}.parquet" for i in range(3))}
    assert_only_whole_files(out)
    driver = subprocess.Popen([sys.executable, "-m", "bgesmall.cli", *driver_args], cwd=tmp_path, env=env(),
                              stderr=subprocess.PIPE)  # killed from outside, wherever it is after shard 5
    driver_killer = Outside(lambda: [driver.pid], lambda: (out / "part-000005.parquet").exists(), out)
    driver_killer.start()
    driver_killer.join()
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read().decode()
    assert_only_whole_files(out)
    written = len(jobs.JobFolder(out).complete_shards(6))
    assert 6 <= written < shards - 3

    # the same job again, its actor killed once it has written two more shards: restarted, its shards retried
    stats: dict = {}
    actor_killer = Outside(lambda: stats.get("actor_pids"),
                           lambda: jobs.shard_path(out, written + 1).exists(), out)
    actor_killer.start()
    summary = bray.run_job(src, out, opts, model_dir=str(minilm_dir), address="local", settings=settings,
                           progress=False, stats=stats)
    actor_killer.join()
    assert actor_killer.killed and actor_killer.shards_then < shards - 1, "killed too late to tell"
    assert summary.rows == rows and summary.resumed_rows == 6 * written
    resumed = jobs.read_job(out)
    assert resumed.column("id").to_pylist() == list(range(rows))
    assert resumed.drop_columns(["embedding"]).equals(whole.drop_columns(["embedding"]))
    assert np.array_equal(vectors(resumed), vectors(whole), equal_nan=True)  # bit for bit
    manifest = json.loads((out / jobs.MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == rows and manifest["null_rows"] == 7
    assert [s["rows"] for s in manifest["shards"]] == [6] * shards and manifest["job"]["precision"] == "fp32"
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]

    assert cli.main(args(out)) == 0  # complete: nothing to do (Ray not even reached)
    assert f"({rows} done by an earlier run)" in capsys.readouterr().err
    other = tmp_path / "other-model"
    shutil.copytree(minilm_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    other_args = args(out)
    other_args[other_args.index("--model") + 1] = str(other)
    assert cli.main(other_args) == 1  # refused before Ray is reached
    err = capsys.readouterr().err
    assert "the model changed" in err and "files that differ: config.json" in err and "--overwrite" in err
    pq.write_table(table.slice(40, 20), tmp_path / "in" / "b.parquet")
    assert cli.main(args(out)) == 1
    err = capsys.readouterr().err
    assert "the input changed (b.parquet changed size" in err and "--overwrite" in err and err.count("\n") == 1
    assert cli.main([*args(out), "--overwrite"]) == 0
    assert jobs.read_job(out).column("id").to_pylist() == list(range(60))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_precision_is_checked_before_anything_starts_and_bf16_loads(minilm_dir, minilm):
    from bgesmall.kernels.matmul import HAS_BF16

    with pytest.raises(ValueError, match=r"precision 'int8' is not a tier.*'fp32', 'bf16'"):
        bray.embed_dataset(None, model=minilm_dir, precision="int8")  # no dataset, no Ray: refused first
    with pytest.raises(ValueError, match=r"precision 'int8' is not a tier"):
        bray.Embedder(model=str(minilm_dir), precision="int8")
    assert bray.Embedder(model=str(minilm_dir), precision="fp32", threads=1).precision == "fp32"
    embedder = bray.Embedder(model=str(minilm_dir), precision="BF16", threads=1)  # any case
    assert embedder.precision == embedder.model.precision == ("bf16" if HAS_BF16 else "fp32")
    out = embedder(docs(8).slice(0, 8))
    got = np.array(out.column("embedding").to_pylist()[:5], np.float32)
    texts = docs(8).column("text").to_pylist()[:5]
    assert cosines(got, minilm.embed(texts)).min() >= 0.9995


def test_a_job_actor_that_would_run_another_tier_refuses(minilm_dir, monkeypatch):
    """A job folder's shards are all of its manifest's tier: an actor on a node without AVX512_BF16 refuses a
    bf16 job (said in one line) instead of embedding its shards in fp32."""
    import bgesmall.kernels.matmul as matmul
    from bgesmall import precision as tiers

    monkeypatch.setattr(matmul, "HAS_BF16", False)
    monkeypatch.setattr(tiers, "_warned", False)
    bundle = bray.ModelBundle.from_folder(minilm_dir, shared=True)  # no object store: runs here, without Ray
    actor = bray.ShardActor(bray.EmbedOptions(), 4, lambda i: f"row {i}", "bf16", threads=1)
    with pytest.warns(RuntimeWarning), pytest.raises(jobs.JobError, match=r"runs precision 'fp32', not this job's "
                                                                          r"'bf16' \(bf16 needs a CPU with AVX512_BF16\)"):
        actor.load(bundle)
    assert bray.ShardActor(bray.EmbedOptions(), 4, str, "fp32", threads=1).load(bundle) == os.getpid()


def test_embed_dataset_and_a_cli_ray_job_in_bf16(local_ray, tmp_path, minilm_dir, minilm, capsys):
    from bgesmall.kernels.matmul import HAS_BF16

    table = docs(40)
    texts = table.column("text").to_pylist()
    present = [i for i, t in enumerate(texts) if t is not None]
    exact = minilm.embed([texts[i] for i in present])
    ds = bray.embed_dataset(ray.data.from_arrow(table), model=minilm_dir, batch_size=16, precision="BF16")
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    emb = out.column("embedding").to_pylist()
    assert [i for i, v in enumerate(emb) if v is None] == [i for i, t in enumerate(texts) if t is None]
    assert cosines(np.array([emb[i] for i in present], np.float32), exact).min() >= 0.9995

    pq.write_table(table, tmp_path / "docs.parquet")
    job = tmp_path / "job"
    args = ["embed", "--ray", "--model", str(minilm_dir), "-q", "-i", str(tmp_path / "docs.parquet"), "-o", str(job),
            "--shard-rows", "16", "--batch-size", "4"]
    assert cli.main([*args, "--precision", "bf16"]) == 0
    manifest = json.loads((job / jobs.MANIFEST).read_text())
    assert manifest["complete"] and manifest["job"]["precision"] == "bf16"  # every actor must run it
    got = vectors(jobs.read_job(job))[present]
    assert cosines(got, exact).min() >= 0.9995
    if HAS_BF16:
        assert not np.array_equal(got, exact), "bf16 ran the exact tier"
    capsys.readouterr()
    assert cli.main(args) == 1  # the default, fp32, on a bf16 folder: refused before Ray is reached
    err = capsys.readouterr().err
    assert "precision changed ('bf16' -> 'fp32')" in err and "--overwrite" in err and err.count("\n") == 1
    assert cli.main([*args, "--precision", "BF16"]) == 0  # the same tier: complete, nothing to do
    assert "(40 done by an earlier run)" in capsys.readouterr().err


def test_a_damaged_model_file_is_refused(local_ray, minilm_dir):
    bundle = bray.ModelBundle.from_folder(minilm_dir)
    bad = replace(bundle, hashes={**bundle.hashes, "config.json": "0" * 64})
    with pytest.raises(ValueError, match="config.json arrived damaged"):
        bad.materialize()
    assert (bundle.materialize() / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_two_node_cluster(tmp_path, minilm_dir, minilm):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        table = docs(60)
        blocks = [table.slice(i, 10) for i in range(0, 60, 10)]
        ds = bray.embed_dataset(ray.data.from_arrow(blocks), model=minilm_dir, batch_size=10, concurrency=2,
                                num_cpus=1, model_path_shared=True)
        check(pa.concat_tables(ray.get(ds.to_arrow_refs())), table, minilm, 60)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_without_ray_the_cli_says_which_extra(monkeypatch, tmp_path, capsys):
    import bgesmall

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "bgesmall.ray")
    monkeypatch.delattr(bgesmall, "ray")
    assert cli.main(["embed", "--ray", "-i", str(tmp_path / "x.parquet"), "-o", str(tmp_path / "v")]) == 1
    assert "pip install 'bgesmall[ray]'" in capsys.readouterr().err
