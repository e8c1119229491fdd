"""Downloads with checksums: published datasets and pretrained weights, resumed, verified, unpacked.

A dataset is a list of `Remote` files (geofm/tasks/downloads/<task>.yaml, read with `read_list`).
`fetch` downloads each into a cache (a `.part` file resumed with an HTTP Range request after a
dropped connection, retried with backoff), verifies it against its sha256, unpacks everything into
a temporary folder beside the destination, checks the task's layout there, and only then moves the
folder into place: a failed or interrupted download never leaves a half-written dataset.

Checksum policy: an entry without a pinned sha256 is refused unless the caller sets
`trust_published`; then the file is verified against the hash its host publishes (Hugging Face:
the sha256 in `X-Linked-Etag` for LFS files, the git blob sha1 in `ETag` for small files; Zenodo:
the md5 in its records API, listed by the entry's `checksums` URL), and the sha256 seen is written
to the `pins` file, which pins it for every later run. A host that publishes nothing is refused.

The base URL always comes from the caller (configuration); nothing here names a host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urljoin, urlsplit

import requests
import tenacity
import yaml

LISTS = Path(__file__).resolve().parent / "tasks" / "downloads"
RECORD = ".geofm-download.json"  # written into a fetched dataset: what was downloaded, and its hashes
UNPACK = ("file", "tar", "tar.gz", "tgz", "zip")
CHUNK = 1 << 20
HEX64, HEX40 = (re.compile(f"^[0-9a-f]{{{n}}}$") for n in (64, 40))


class DownloadError(RuntimeError):
    """A download failed; the message is one line that names the file or URL and the cause."""


@dataclass(frozen=True)
class Remote:
    """One published file and how it lands in the dataset folder."""

    url: str  # relative to the base URL, or absolute
    sha256: str | None = None  # pinned; None: not known yet (see the checksum policy above)
    size: int | None = None  # bytes, if known
    unpack: str = "file"  # file (copied as is), tar, tar.gz, tgz or zip
    into: str = ""  # folder inside the dataset root it lands in
    strip: int = 0  # leading path components dropped from archive members
    only: str = ""  # keep only archive members under this path (before stripping)
    md5: str | None = None  # pinned md5 (as a host such as Zenodo publishes it), checked as well
    checksums: str | None = None  # URL of the host's checksum listing for this file (Zenodo records API)

    def __post_init__(self):
        if self.unpack not in UNPACK:
            raise ValueError(f"{self.url}: unpack must be one of {', '.join(UNPACK)}, not {self.unpack!r}")
        if self.sha256 is not None and not HEX64.match(self.sha256):
            raise ValueError(f"{self.url}: sha256 must be 64 lowercase hex digits")

    @property
    def name(self) -> str:
        return unquote(PurePosixPath(urlsplit(self.url).path).name)

    def cache_path(self, cache_dir: Path) -> Path:
        """Where the downloaded file is kept: by its URL path (relative), or host and path (absolute)."""
        parts = urlsplit(self.url)
        path = unquote(parts.netloc + "/" + parts.path)
        return Path(cache_dir).joinpath(*[p for p in path.split("/") if p not in ("", ".", "..")])


@dataclass(frozen=True)
class Fetched:
    """A verified file: where it is cached, its hashes, and what the host told about it."""

    remote: Remote
    path: Path
    sha256: str
    size: int
    verified_by: str  # "pinned sha256" or the published hash it was checked against
    commit: str | None = None  # Hugging Face: the repository commit the URL resolved to


@dataclass
class _Http:
    timeout: tuple[float, float]
    attempts: int
    backoff: float
    log: Callable[[str], None]
    local: threading.local = field(default_factory=threading.local)
    stop: threading.Event = field(default_factory=threading.Event)  # set: abandon downloads (resumable)

    @property
    def session(self) -> requests.Session:  # one per thread
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            # identity: the bytes on disk are the bytes the host hashed, and Range offsets mean them
            self.local.session.headers.update({"User-Agent": "geofm-pipeline", "Accept-Encoding": "identity"})
        return self.local.session


class _Transient(Exception):
    """Worth another attempt: a dropped connection, a 5xx, a short body."""


def read_list(path: Path) -> tuple[str, list[Remote]]:
    """A download list: its default base URL and its files (entries with `range: [first, last]`
    stand for one file per number n, `{n}` in url and into replaced)."""
    doc = yaml.safe_load(Path(path).read_text())
    remotes = []
    for item in doc["files"]:
        item = dict(item)
        first, last = item.pop("range", (None, None))
        if first is None:
            remotes.append(Remote(**item))
            continue
        for n in range(first, last + 1):
            remotes.append(Remote(**{**item, "url": item["url"].format(n=n), "into": item.get("into", "").format(n=n)}))
    return doc["base_url"], remotes


def task_list(task: str) -> Path:
    return LISTS / f"{task}.yaml"


def fetch(
    entries: Iterable[Remote],
    base_url: str,
    dest: Path,
    cache_dir: Path,
    *,
    check: Callable[[Path], str | None] | None = None,
    trust_published: bool = False,
    pins: Path | None = None,
    timeout: tuple[float, float] = (10.0, 60.0),
    attempts: int = 5,
    backoff: float = 1.0,
    workers: int = 4,
    log: Callable[[str], None] = print,
) -> list[Fetched]:
    """Download, verify and unpack `entries` into the new folder `dest`; `check(folder)` (e.g.
    `Task.check_layout`) must accept the result before it is moved into place. `timeout` is
    (connect, read) seconds; each file gets `attempts` tries with exponential backoff."""
    dest, cache_dir = Path(dest), Path(cache_dir)
    if dest.exists() and any(dest.iterdir()):
        raise DownloadError(f"{dest} already exists and is not empty; delete it to download again")
    pinned = _read_pins(pins)
    entries = [_pin(e, base_url, pinned) for e in entries]
    unpinned = [e.url for e in entries if not e.sha256]
    if unpinned and not trust_published:
        raise DownloadError(
            f"{len(unpinned)} file(s) have no pinned sha256 (first: {unpinned[0]}); pin them in the download "
            "list, or allow verifying against the host's published checksums (trust_published)"
        )
    http = _Http(timeout, attempts, backoff, log)
    done: list[Fetched] = []
    total = len(entries)

    def one(remote: Remote) -> Fetched:
        got = _obtain(http, remote, base_url, remote.cache_path(cache_dir))
        done.append(got)
        if total <= 20 or len(done) % max(1, total // 50) == 0 or len(done) == total:
            log(f"{len(done)}/{total} files verified ({sum(f.size for f in done) / 2**20:.1f} MiB)")
        return got

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(one, e) for e in entries]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                fetched = [f.result() for f in futures]
            except BaseException:
                http.stop.set()
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        _write_pins(pins, pinned, base_url, done)
    _install(fetched, base_url, dest, check, log)
    return fetched


def hf_url(repo_id: str, filename: str, revision: str = "main", repo_type: str = "model") -> str:
    """A file's resolve URL on a Hugging Face endpoint, relative to the endpoint."""
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    return f"{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def fetch_weights(
    repo_id: str,
    filename: str,
    cache_dir: Path,
    *,
    endpoint: str,
    revision: str = "main",
    sha256: str | None = None,
    trust_published: bool = False,
    pins: Path | None = None,
    timeout: tuple[float, float] = (10.0, 60.0),
    attempts: int = 5,
    backoff: float = 1.0,
    log: Callable[[str], None] = print,
) -> Fetched:
    """Pretrained weights from a Hugging Face endpoint (`endpoint`, e.g. $HF_ENDPOINT), verified
    like a dataset file and cached under <cache_dir>/<owner>--<name>/<revision>/<filename>."""
    pinned = _read_pins(pins)
    remote = _pin(Remote(url=hf_url(repo_id, filename, revision), sha256=sha256), endpoint, pinned)
    if not remote.sha256 and not trust_published:
        raise DownloadError(
            f"{repo_id}/{filename}@{revision} has no pinned sha256; pin it, or allow verifying against the "
            "sha256 the hub publishes (trust_published)"
        )
    target = Path(cache_dir) / repo_id.replace("/", "--") / quote(revision, safe="") / filename
    got = _obtain(_Http(timeout, attempts, backoff, log), remote, endpoint, target)
    _write_pins(pins, pinned, endpoint, [got])
    return got


# ---------------------------------------------------------------------------------- downloading
def _absolute(base_url: str, url: str) -> str:
    return urljoin(base_url if base_url.endswith("/") else base_url + "/", url)


def _obtain(http: _Http, remote: Remote, base_url: str, target: Path) -> Fetched:
    """The verified file at `target`: reused when it matches its pinned sha256, else downloaded."""
    url = _absolute(base_url, remote.url)
    if target.is_file() and remote.sha256 and _hashes(target)["sha256"] == remote.sha256:
        return Fetched(remote, target, remote.sha256, target.stat().st_size, "pinned sha256 (cached)")
    target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    published = {}
    if remote.checksums and not remote.sha256:
        listing = _absolute(base_url, remote.checksums)
        published = _retrying(http, listing, lambda: _listed(http, listing, remote.name))
    published.update(_retrying(http, url, lambda: _get(http, url, part, remote)))
    wanted = {"md5"} if remote.md5 else set()
    hashes = _hashes(part, wanted | ({"md5", "git-sha1"} & published.keys()))
    size = part.stat().st_size
    verified_by = _verify(remote, url, part, hashes, size, published)
    part.replace(target)
    return Fetched(remote, target, hashes["sha256"], size, verified_by, published.get("commit"))


def _retrying(http: _Http, url: str, request: Callable[[], dict]) -> dict:
    """The one retry policy: transient failures are retried with exponential backoff; the last
    one fails in one line."""
    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(http.attempts),
            wait=tenacity.wait_exponential(multiplier=http.backoff, max=60),
            before_sleep=lambda s: http.log(f"GET {url}: {s.outcome.exception()}; retrying"),
            reraise=True,
        ):
            with attempt:
                return request()
    except _Transient as e:
        raise DownloadError(f"GET {url}: {e} after {http.attempts} attempt(s); run again to resume") from None


@contextmanager
def _errors(http: _Http):
    """Network failures as _Transient, with a short reason."""
    try:
        yield
    except requests.Timeout as e:
        which = "connect" if isinstance(e, requests.ConnectTimeout) else "read"
        seconds = http.timeout[0] if which == "connect" else http.timeout[1]
        raise _Transient(f"no answer within {seconds:g} s ({which} timeout)") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        raise _Transient(f"connection failed ({_short(e)})") from None


def _status(r: requests.Response, url: str):
    if r.status_code >= 500 or r.status_code in (408, 429):
        raise _Transient(f"HTTP {r.status_code} {r.reason}")
    if r.status_code >= 400:
        raise DownloadError(f"GET {url}: HTTP {r.status_code} {r.reason}")


def _get(http: _Http, url: str, part: Path, remote: Remote) -> dict[str, str]:
    """One GET of `url` into `part`, resuming from its current size; returns the published hashes."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with _errors(http), http.session.get(url, headers=headers, stream=True, timeout=http.timeout) as r:
        published = _published(r)
        if r.status_code == 416 and offset:  # nothing left to send: the part is complete, or stale
            if remote.size is None or offset != remote.size:
                part.unlink()
                raise _Transient("server refused to resume (HTTP 416); starting over")
            return published
        _status(r, url)
        if offset and r.status_code != 206:  # the server ignored the Range header
            http.log(f"{remote.name}: server does not resume (HTTP {r.status_code}); downloading from the start")
            offset = 0
        elif offset:
            http.log(f"{remote.name}: resuming at byte {offset}")
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length else (remote.size or published.get("size"))
        total = int(total) if total else None
        if remote.size is not None and total is not None and total != remote.size:  # fail before a long download
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{remote.name}: size mismatch: expected {remote.size}, the server sends {total} bytes ({url})"
            )
        progress = _Progress(remote.name, total, offset, http.log)
        with open(part, "ab" if offset else "wb") as f:
            for chunk in r.iter_content(CHUNK):
                if http.stop.is_set():
                    raise DownloadError(f"GET {url}: abandoned after another file failed (resumable)")
                f.write(chunk)
                progress.add(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Transient(f"connection dropped at byte {got} of {total}")
    return published


def _published(r: requests.Response) -> dict[str, str]:
    """Hashes the host publishes in its response headers, over the redirect chain (Hugging Face
    puts them on the redirect to its storage)."""
    out: dict[str, str] = {}
    for resp in [*r.history, r]:
        h = resp.headers
        linked = h.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        if HEX64.match(linked):
            out["sha256"] = linked
        if h.get("X-Linked-Size", "").isdigit():
            out["size"] = h["X-Linked-Size"]
        if h.get("X-Repo-Commit"):
            out["commit"] = h["X-Repo-Commit"]
            etag = h.get("ETag", "").removeprefix("W/").strip('"')
            if HEX40.match(etag) and "sha256" not in out:  # a small (non-LFS) file: its git blob sha1
                out["git-sha1"] = etag
    return out


def _listed(http: _Http, url: str, name: str) -> dict[str, str]:
    """The checksum a host lists for file `name` in its records API at `url` (Zenodo:
    files[].checksum = 'md5:...'); {} when it lists none."""
    with _errors(http):
        r = http.session.get(url, timeout=http.timeout)
    _status(r, url)
    doc = r.json()
    files = doc.get("files", doc.get("entries", []))
    files = files.get("entries", files) if isinstance(files, dict) else files
    files = list(files.values()) if isinstance(files, dict) else files
    for item in files:
        if name in (item.get("key"), item.get("filename")) and ":" in item.get("checksum", ""):
            algorithm, value = item["checksum"].split(":", 1)
            return {algorithm: value.lower()}
    return {}


def _verify(remote: Remote, url: str, part: Path, hashes: dict[str, str], size: int, published: dict) -> str:
    """Check the downloaded `part`; on any mismatch delete it and fail with one line."""

    def fail(what: str, expected, actual):
        part.unlink(missing_ok=True)
        raise DownloadError(f"{remote.name}: {what} mismatch: expected {expected}, got {actual} ({url}); deleted it")

    if remote.size is not None and size != remote.size:
        fail("size", remote.size, size)
    if remote.md5 and hashes["md5"] != remote.md5:
        fail("md5", remote.md5, hashes["md5"])
    if remote.sha256:
        if hashes["sha256"] != remote.sha256:
            fail("sha256", remote.sha256, hashes["sha256"])
        return "pinned sha256"
    for algorithm in ("sha256", "md5", "git-sha1"):
        if algorithm in published:
            if hashes[algorithm] != published[algorithm]:
                fail(f"{algorithm} (published by the host)", published[algorithm], hashes[algorithm])
            return f"{algorithm} published by the host"
    part.unlink(missing_ok=True)
    raise DownloadError(f"{remote.name}: no pinned sha256 and the host publishes no checksum ({url}); pin one")


def _hashes(path: Path, extra: set[str] = frozenset()) -> dict[str, str]:
    """sha256 of a file, plus md5 and/or git-sha1 (a git blob id) when asked for."""
    hashers = {"sha256": hashlib.sha256(), **{a: hashlib.md5() for a in extra & {"md5"}}}
    if "git-sha1" in extra:
        hashers["git-sha1"] = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


class _Progress:
    """Plain log lines while a file downloads: every 5% (or every 256 MiB when the size is unknown)."""

    def __init__(self, name: str, total: int | None, start: int, log: Callable[[str], None]):
        self.name, self.total, self.got, self.log = name, total, start, log
        self.step = max(total // 20, CHUNK) if total else 256 * CHUNK
        self.next, self.t0, self.start = start + self.step, time.monotonic(), start

    def add(self, n: int):
        self.got += n
        if self.got >= self.next and (not self.total or self.total >= 8 * CHUNK):
            self.next += self.step
            rate = (self.got - self.start) / max(time.monotonic() - self.t0, 1e-6) / 2**20
            of = f" of {self.total / 2**20:.1f} MiB ({100 * self.got // self.total}%)" if self.total else ""
            self.log(f"{self.name}: {self.got / 2**20:.1f} MiB{of}, {rate:.1f} MiB/s")


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


# ---------------------------------------------------------------------------------- pins
# A pins file maps each absolute URL to the sha256 it served once verified against the host's
# published hash: later runs check that exact content (a changed upstream file then fails loudly).
def _read_pins(pins: Path | None) -> dict[str, dict]:
    return json.loads(Path(pins).read_text()) if pins and Path(pins).is_file() else {}


def _pin(remote: Remote, base_url: str, pinned: dict[str, dict]) -> Remote:
    known = pinned.get(_absolute(base_url, remote.url))
    return replace(remote, sha256=known["sha256"]) if known and not remote.sha256 else remote


def _write_pins(pins: Path | None, known: dict[str, dict], base_url: str, fetched: list[Fetched]):
    """Record the sha256 of files verified against a published hash: later runs are pinned."""
    new = [f for f in fetched if "published" in f.verified_by]
    if not pins or not new:
        return
    for f in new:
        known[_absolute(base_url, f.remote.url)] = {"sha256": f.sha256, "size": f.size, "verified_by": f.verified_by}
    Path(pins).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(pins).with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
    tmp.replace(pins)


# ---------------------------------------------------------------------------------- unpacking
def _install(fetched: list[Fetched], base_url: str, dest: Path, check, log: Callable[[str], None]):
    """Unpack every file into a folder beside `dest`, check it, then move it into place."""
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for f in fetched:
            root = staging / f.remote.into
            root.mkdir(parents=True, exist_ok=True)
            if f.remote.unpack == "file":
                _place(f.path, root / f.remote.name)
                continue
            log(f"unpacking {f.remote.name} into {dest / f.remote.into}")
            try:
                count = (_unzip if f.remote.unpack == "zip" else _untar)(f.path, f.remote, root, staging)
            except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
                raise DownloadError(f"{f.remote.name}: cannot unpack it ({_short(e)})") from None
            if not count:
                raise DownloadError(f"{f.remote.name}: no files under {f.remote.only or 'its root'!r} in the archive")
        problem = check(staging) if check else None
        if problem:
            problem = problem.replace(str(staging), str(dest))  # name the folder the user asked for
            raise DownloadError(f"the downloaded files are not the layout the task reads: {problem}")
        record = {
            "base_url": base_url,
            "files": [{"url": f.remote.url, "sha256": f.sha256, "size": f.size} for f in fetched],
        }
        (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked before downloading)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"dataset ready in {dest} ({len(fetched)} file(s) verified)")


def _place(src: Path, dst: Path):
    """A cached file into the dataset: hard-linked (no second copy on disk) where possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _member_path(name: str, remote: Remote) -> str | None:
    """Where an archive member lands relative to `into`, None to skip it; unsafe names fail."""
    path = name.replace("\\", "/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        raise DownloadError(f"{remote.name}: refusing member {name!r}, which points outside the destination")
    if any(p.startswith("._") or p in ("__MACOSX", ".DS_Store") for p in parts):  # macOS metadata
        return None
    only = [p for p in remote.only.split("/") if p not in ("", ".")]
    if parts[: len(only)] != only:
        return None
    return "/".join(parts[remote.strip :]) or None


def _inside(path: Path, top: Path) -> bool:
    path, top = os.path.realpath(path), os.path.realpath(top)
    return path == top or path.startswith(top + os.sep)


def _target(name: str, remote: Remote, root: Path, top: Path) -> Path | None:
    """The path a file member of an archive is written to (its folder created inside `top`), None
    to skip it. Folders are created as their files need them."""
    rel = _member_path(name, remote)
    if rel is None:
        return None
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(target.parent, top):
        raise DownloadError(f"{remote.name}: refusing member {name!r}, which points outside the destination")
    if target.is_symlink():  # a later member of the same name never writes through a link
        target.unlink()
    return target


def _untar(archive: Path, remote: Remote, root: Path, top: Path) -> int:
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            target = None if member.isdir() else _target(member.name, remote, root, top)
            if target is None:
                continue
            if member.issym():
                if os.path.isabs(member.linkname) or not _inside(target.parent / member.linkname, top):
                    raise DownloadError(
                        f"{remote.name}: refusing link {member.name!r} -> {member.linkname!r}, which points outside the destination"
                    )
                target.symlink_to(member.linkname)
            elif member.islnk():
                linked = _member_path(member.linkname, remote)
                if linked is None or not (root / linked).is_file():
                    raise DownloadError(f"{remote.name}: refusing hard link {member.name!r} -> {member.linkname!r}")
                shutil.copyfile(root / linked, target)
            elif member.isfile():
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                count += 1
            else:
                raise DownloadError(f"{remote.name}: refusing member {member.name!r}, which is not a file or folder")
    return count


def _unzip(archive: Path, remote: Remote, root: Path, top: Path) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DownloadError(f"{remote.name}: refusing link {info.filename!r} in a zip archive")
            target = None if info.is_dir() else _target(info.filename, remote, root, top)
            if target is None:
                continue
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            count += 1
    return count


def weights_key(hub_id: str, filename: str, revision: str) -> str:
    """A cache folder name made of what identifies a weights file: hub id, file name and revision."""
    return "--".join(str(part).replace("/", "--") for part in (hub_id, filename, revision))
