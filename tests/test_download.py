"""bgesmall.download and bgesmall.locate against a fake hub on 127.0.0.1 (tests/hubserver.py)."""

from __future__ import annotations

import errno
import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import REPO_ID, REVISION, FakeHub, sample_files  # noqa: E402

from bgesmall import download as dl  # noqa: E402
from bgesmall import locate  # noqa: E402

UNPINNED = dl.manifest_for(REPO_ID, REVISION)
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No hub variables from the caller; caches and the checkout's weights folder under tmp_path."""
    for name in ("BGESMALL_MODEL", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT",
                 "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    checkout = tmp_path / "checkout" / "weights" / locate.MODEL_FOLDER
    monkeypatch.setattr(locate, "checkout_weights_dir", lambda: checkout)


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def pinned(files: dict[str, bytes], repo_id=dl.REPO_ID, revision=dl.REVISION) -> dl.Manifest:
    """A manifest pinning these files' sha256, like BGE_SMALL pins the real ones."""
    specs = tuple(dl.RepoFile(n, hashlib.sha256(b).hexdigest()) for n, b in files.items())
    return dl.Manifest(repo_id, revision, specs)


def test_clean_download(tmp_path):
    files = sample_files()
    with FakeHub(files) as hub:
        reports = dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
        large = hub.state.gets("/cdn/" + hashlib.sha256(files["model.safetensors"]).hexdigest(), "cdn")
    assert files_in(tmp_path / "m") == sorted(files)  # no .part file left, optional absent files skipped
    for name, data in files.items():
        assert (tmp_path / "m" / name).read_bytes() == data
    status = {r.name: r.status for r in reports}
    assert status["model.safetensors"] == "downloaded" and status["vocab.txt"] == "absent"
    assert len(large) == 1 and "Range" not in large[0]  # the LFS file came from the CDN, in one piece


def test_head_reads_metadata_on_the_redirect_and_keeps_the_token_on_the_hub(tmp_path):
    with FakeHub(token="hf_secret") as hub:
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url, token="hf_secret")
        hub_heads = [h for s, m, p, h in hub.requests if s == "hub"]
        cdn = [h for s, m, p, h in hub.requests if s == "cdn"]
    assert all(h.get("Authorization") == "Bearer hf_secret" for h in hub_heads)
    assert all(h.get("Accept-Encoding") == "identity" for h in hub_heads)
    assert cdn and not any("Authorization" in h for h in cdn)  # never forwarded to the other origin
    assert [m for s, m, p, h in hub.requests if s == "cdn"] == ["GET"]  # HEAD did not follow the 302


def test_token_from_hf_token_env(tmp_path, monkeypatch):
    with FakeHub(token="hf_env") as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_env")
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_401_without_token(tmp_path):
    with FakeHub(token="hf_secret") as hub, pytest.raises(dl.HubError) as err:
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert err.value.status == 401 and "HF_TOKEN" in str(err.value)
    assert files_in(tmp_path) == []


def test_401_with_a_wrong_token_says_the_token_was_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with FakeHub(token="hf_secret") as hub, pytest.raises(dl.HubError, match="refused it"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)


@pytest.mark.parametrize(
    "manifest, words",
    [
        (dl.manifest_for("nobody/nothing", REVISION), "repo does not exist"),
        (dl.manifest_for(REPO_ID, "f" * 40), "revision does not exist"),
    ],
)
def test_404_repo_or_revision(tmp_path, manifest, words):
    with FakeHub() as hub, pytest.raises(dl.HubError) as err:
        dl.download(tmp_path / "m", manifest, endpoint=hub.url)
    assert err.value.status == 404 and words in str(err.value)
    assert files_in(tmp_path) == []


def test_404_on_a_required_file(tmp_path):
    files = sample_files()
    del files["tokenizer.json"]
    with FakeHub(files) as hub, pytest.raises(dl.HubError, match=r"404.*tokenizer\.json"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert not (tmp_path / "m" / "tokenizer.json").exists()


def test_renamed_repo_redirect_within_the_hub_is_followed(tmp_path):
    with FakeHub(renamed_from="old-org/tiny-bert") as hub:
        dl.download(tmp_path / "m", dl.manifest_for("old-org/tiny-bert", REVISION), endpoint=hub.url)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == sample_files()["model.safetensors"]


def test_interrupted_run_keeps_no_model_and_a_rerun_resumes_with_range(tmp_path):
    files = sample_files()
    dest = tmp_path / "m"
    with FakeHub(files, cut_once={"model.safetensors": 100_000}) as hub:
        with pytest.raises(dl.NetworkError, match="rerun `bgesmall download` to resume"):
            dl.download(dest, UNPINNED, endpoint=hub.url, retries=0)
        assert not (dest / "model.safetensors").exists()  # never under its final name half-written
        parts = [p for p in dest.iterdir() if p.name.endswith(".part")]
        assert len(parts) == 1 and parts[0].stat().st_size == 100_000
        dl.download(dest, UNPINNED, endpoint=hub.url)
        ranges = [h.get("Range") for h in hub.state.gets("", "cdn")]
    assert ranges == [None, "bytes=100000-"]
    assert (dest / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not any(p.name.endswith(".part") for p in dest.iterdir())


def test_interrupted_transfer_resumes_within_the_same_run(tmp_path):
    files = sample_files()
    with FakeHub(files, cut_once={"model.safetensors": 70_000}) as hub:
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
        ranges = [h.get("Range") for h in hub.state.gets("", "cdn")]
    assert ranges == [None, "bytes=70000-"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == files["model.safetensors"]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])  # sha256 (LFS) and git blob id (small)
def test_corrupted_file_is_rejected_and_nothing_kept(tmp_path, name):
    dest = tmp_path / "m"
    with FakeHub(corrupt={name}) as hub, pytest.raises(dl.ChecksumError) as err:
        dl.download(dest, UNPINNED, endpoint=hub.url)
    assert "checksum mismatch" in str(err.value) and "nothing kept" in str(err.value)
    assert name not in files_in(dest) if dest.exists() else True
    assert not dest.exists() or not any(p.name.endswith(".part") for p in dest.rglob("*"))


def test_two_downloads_into_one_folder_take_turns(tmp_path):
    import threading

    files = sample_files()
    manifest = pinned(files)
    errors = []

    def fetch(url):
        try:
            dl.download(tmp_path / "m", manifest, endpoint=url)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        threads = [threading.Thread(target=fetch, args=(hub.url,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        model_gets = hub.state.gets("/cdn/" + hashlib.sha256(files["model.safetensors"]).hexdigest())
    assert errors == [] and len(model_gets) == 1  # the second found the first's verified files
    assert files_in(tmp_path / "m") == sorted(files)


def test_offline_makes_no_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with FakeHub() as hub, pytest.raises(dl.OfflineError, match="HF_HUB_OFFLINE=1"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert hub.requests == []


def test_no_network(tmp_path):
    with pytest.raises(dl.NetworkError, match="cannot reach the hub"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=REFUSED)
    assert not (tmp_path / "m").exists()  # no empty folder left for locate to stumble on


def test_rerun_skips_verified_files(tmp_path):
    with FakeHub() as hub:
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
        hub.requests.clear()
        reports = dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
        gets = hub.state.gets("")
    assert gets == []  # only HEADs: each local file was checked against the hub's hash
    assert {r.status for r in reports} == {"verified", "absent"}


def test_pinned_files_already_present_need_no_network(tmp_path):
    files = sample_files()
    manifest = pinned(files)
    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        dl.download(tmp_path / "m", manifest, endpoint=hub.url)
    reports = dl.download(tmp_path / "m", manifest, endpoint=REFUSED)  # would fail if it touched the network
    assert {r.status for r in reports} == {"verified"}
    assert all(c.status == "ok" for c in dl.check_folder(tmp_path / "m", manifest))


def test_pinned_manifest_refuses_other_bytes_than_the_pinned_ones(tmp_path):
    """A mirror serving BAAI/bge-small-en-v1.5@REVISION with other content fails the pinned sha256."""
    with FakeHub(repo_id=dl.REPO_ID, revision=dl.REVISION) as hub, pytest.raises(dl.ChecksumError, match="pinned"):
        dl.download(tmp_path / "m", dl.BGE_SMALL, endpoint=hub.url)
    assert not any((tmp_path / "m").rglob("*.json")) and not any((tmp_path / "m").rglob("*.safetensors"))


def test_pinned_size_mismatch_is_refused_before_downloading(tmp_path):
    files = sample_files()
    manifest = dl.Manifest(dl.REPO_ID, dl.REVISION, tuple(
        dl.RepoFile(n, hashlib.sha256(b).hexdigest(), len(b) + (n == "model.safetensors")) for n, b in files.items()))
    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        with pytest.raises(dl.ChecksumError, match="announces size 300000 for model.safetensors"):
            dl.download(tmp_path / "m", manifest, endpoint=hub.url)
        assert hub.state.gets("", "cdn") == []


def test_pinned_file_tampered_locally_is_fetched_again(tmp_path):
    files = sample_files()
    manifest = pinned(files)
    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        dl.download(tmp_path / "m", manifest, endpoint=hub.url)
        (tmp_path / "m" / "config.json").write_text("{}")
        assert [c.status for c in dl.check_folder(tmp_path / "m", manifest) if c.name == "config.json"] == ["mismatch"]
        reports = dl.download(tmp_path / "m", manifest, endpoint=hub.url)
    assert [r.status for r in reports if r.name == "config.json"] == ["downloaded"]
    assert (tmp_path / "m" / "config.json").read_bytes() == files["config.json"]


def test_disk_full_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_free_bytes", lambda folder: 1000)
    with FakeHub() as hub, pytest.raises(dl.DiskFullError, match="disk full.*--to DIR"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert "model.safetensors" not in files_in(tmp_path / "m")


def test_disk_full_while_writing_keeps_nothing(tmp_path, monkeypatch):
    real_get = dl._get

    def get_then_enospc(remote, part, **kw):
        if remote.name == "model.safetensors":
            part.write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_get(remote, part, **kw)

    monkeypatch.setattr(dl, "_get", get_then_enospc)
    with FakeHub() as hub, pytest.raises(dl.DiskFullError, match="Nothing partial was kept"):
        dl.download(tmp_path / "m", UNPINNED, endpoint=hub.url)
    assert not any("model.safetensors" in p.name for p in (tmp_path / "m").iterdir())


def test_bge_manifest_names_the_pinned_revision():
    assert dl.BGE_SMALL.repo_id == "BAAI/bge-small-en-v1.5"
    assert dl.BGE_SMALL.revision == "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a"
    names = {f.name for f in dl.BGE_SMALL.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
            "sentence_bert_config.json"} <= names
    assert all(len(f.sha256) == 64 and f.size > 0 for f in dl.BGE_SMALL.files)
    assert {f.name: f.size for f in dl.BGE_SMALL.files}["model.safetensors"] == 133_466_304
    assert dl.resolve_url("https://huggingface.co", dl.REPO_ID, dl.REVISION, "1_Pooling/config.json") == (
        "https://huggingface.co/BAAI/bge-small-en-v1.5/resolve/5c38ec7c405ec4b44b94cc5a9bb96e735b38267a/"
        "1_Pooling/config.json"
    )


# ---- locate ----


def make_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in locate.REQUIRED_FILES:
        (path / name).write_bytes(b"{}")
    return path


def hf_snapshot(tmp_path: Path, revision: str) -> Path:
    return tmp_path / "hf" / "hub" / "models--BAAI--bge-small-en-v1.5" / "snapshots" / revision


def test_locate_order(tmp_path, monkeypatch):
    checkout = locate.checkout_weights_dir()
    user = tmp_path / "xdg" / "bgesmall" / "bge-small-en-v1.5"
    other_snapshot = make_folder(hf_snapshot(tmp_path, "a" * 40))
    assert locate.find_model_dir() == other_snapshot
    pinned_snapshot = make_folder(hf_snapshot(tmp_path, dl.REVISION))
    assert locate.find_model_dir() == pinned_snapshot  # the pinned revision before any other
    make_folder(user)
    assert locate.find_model_dir() == user
    make_folder(checkout)
    assert locate.find_model_dir() == checkout
    explicit = make_folder(tmp_path / "elsewhere")
    monkeypatch.setenv("BGESMALL_MODEL", str(explicit))
    assert locate.find_model_dir() == explicit


def test_hf_hub_cache_variable_wins_over_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    snap = make_folder(tmp_path / "hubcache" / "models--BAAI--bge-small-en-v1.5" / "snapshots" / dl.REVISION)
    make_folder(hf_snapshot(tmp_path, dl.REVISION))
    assert locate.find_model_dir() == snap


def test_incomplete_folders_are_skipped(tmp_path):
    user = make_folder(tmp_path / "xdg" / "bgesmall" / "bge-small-en-v1.5")
    (user / "model.safetensors").unlink()
    snap = make_folder(hf_snapshot(tmp_path, dl.REVISION))
    assert locate.find_model_dir() == snap


def test_bad_bgesmall_model_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    make_folder(locate.checkout_weights_dir())
    monkeypatch.setenv("BGESMALL_MODEL", str(tmp_path / "typo"))
    with pytest.raises(locate.ModelNotFoundError, match="BGESMALL_MODEL=.*does not exist"):
        locate.find_model_dir()


def test_offline_and_nothing_found_lists_the_places_and_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(locate.ModelNotFoundError) as err:
        locate.find_model_dir()
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "HF_HUB_OFFLINE=1" in message and "bgesmall download" in message
    for place in (locate.checkout_weights_dir(), tmp_path / "xdg" / "bgesmall", tmp_path / "hf" / "hub"):
        assert str(place) in message
    assert [p.label for p in err.value.searched] == ["BGESMALL_MODEL", "checkout", "user cache", "Hugging Face cache"]
    assert capsys.readouterr().err == ""


def test_no_network_and_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", REFUSED)
    with pytest.raises(locate.ModelNotFoundError, match="(?s)automatic download failed.*bgesmall download"):
        locate.find_model_dir()


def test_first_use_downloads_with_a_one_line_notice(tmp_path, monkeypatch, capsys):
    files = sample_files()
    monkeypatch.setattr(dl, "BGE_SMALL", pinned(files))
    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        found = locate.find_model_dir()
    assert found == locate.checkout_weights_dir()
    assert (found / "model.safetensors").read_bytes() == files["model.safetensors"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "downloading" in err and str(found) in err


def test_checkout_detection_points_at_this_repo():
    root = Path(__file__).resolve().parent.parent
    if not (root / "weights").is_dir() or Path(locate.__file__).resolve().parent.parent != root:
        pytest.skip("bgesmall is not imported from this checkout")
    assert locate.checkout_root() == root


# ---- cross-checks with the official client (a dev dependency of transformers; skipped without it) ----


def test_the_official_client_accepts_the_fake_hub(tmp_path, monkeypatch):
    """huggingface_hub downloads from tests/hubserver.py with the same requests as ours: the fake is hub-shaped."""
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hh = pytest.importorskip("huggingface_hub")
    files = sample_files()
    with FakeHub(files) as hub:
        for name in ("config.json", "model.safetensors"):
            path = hh.hf_hub_download(REPO_ID, name, revision=REVISION, endpoint=hub.url, cache_dir=tmp_path / "c")
            assert Path(path).read_bytes() == files[name]
        theirs = [(s, m) for s, m, p, h in hub.requests]
        hub.requests.clear()
        dl.download(tmp_path / "ours", dl.Manifest(REPO_ID, REVISION, (dl.RepoFile("config.json"),
                                                                        dl.RepoFile("model.safetensors"))),
                    endpoint=hub.url)
        ours = [(s, m) for s, m, p, h in hub.requests]
    assert theirs == ours == [("hub", "HEAD"), ("hub", "GET"), ("hub", "HEAD"), ("cdn", "GET")]


def test_locate_finds_a_cache_written_by_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hh = pytest.importorskip("huggingface_hub")
    files = sample_files()
    with FakeHub(files, repo_id=dl.REPO_ID, revision=dl.REVISION) as hub:
        for name in files:
            hh.hf_hub_download(dl.REPO_ID, name, revision=dl.REVISION, endpoint=hub.url,
                               cache_dir=tmp_path / "hf" / "hub")  # $HF_HOME/hub, as sentence-transformers does
    found = locate.find_model_dir(download=False)
    assert found == hf_snapshot(tmp_path, dl.REVISION)
    assert (found / "model.safetensors").read_bytes() == files["model.safetensors"]  # through the blob symlink
