"""bgesmall.ray on a local Ray (2 CPUs) and on a two-node cluster on this machine; one actor killed mid-job.

Slow (Ray starts its processes: ~15-30 s per cluster): marked `ray`; `pytest -m "not ray"` leaves them out.
"""

from __future__ import annotations

import os
import signal
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

from bgesmall import cli  # noqa: E402
from bgesmall import ray as bray  # noqa: E402

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


def test_cli_ray_job_writes_a_folder_of_parquet(local_ray, tmp_path, minilm_dir, minilm, capsys):
    table = docs(40)
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 25), tmp_path / "in" / "a.parquet")
    pq.write_table(table.slice(25), tmp_path / "in" / "b.parquet")
    out = tmp_path / "vectors"
    assert cli.main(["embed", "--ray", "--model", str(minilm_dir), "-i", str(tmp_path / "in" / "*.parquet"),
                     "-o", str(out)]) == 0
    assert "40 embeddings" in capsys.readouterr().err
    check(pq.read_table(out), table, minilm, 40)
    assert cli.main(["embed", "--ray", "--model", str(minilm_dir), "-i", str(tmp_path / "in"), "-o", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err


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
