"""Downloads against a real HTTP server on loopback (geofm/download.py).

The server serves archives of the sample data in each published archive's structure, at the
URLs of the real download lists (geofm/tasks/downloads/); the tests point the base URL at it.
Nothing here talks to any address but 127.0.0.1, and nothing in geofm.download is patched.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from geofm import download, sample_data
from geofm.download import DownloadError, Remote
from geofm.tasks import TASKS

COUNTS = {  # a few chips per split keep the module fast
    "crop": {"training": 3, "validation": 2},
    "burn_scars": {"training": 2, "validation": 1},
    "biomass": {"train": 2, "val": 1, "test": 1},
    "landslide": {"train": 2, "validation": 1, "test": 1},
}
# What each file of a real download list holds, as paths of the sample dataset.
CONTENT = {
    "crop": {
        "training_chips.tgz": ["training_chips"],
        "validation_chips.tgz": ["validation_chips"],
        "training_data.txt": ["training_data.txt"],
        "validation_data.txt": ["validation_data.txt"],
        "chips_df.csv": ["chips_df.csv"],
    },
    "burn_scars": {"hls_burn_scars.tar.gz": ["training", "validation"]},
    "biomass": {
        "records/12356481/files/granite-geospatial-biomass-datasets.tar.gz?download=1": [
            f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")
        ]
    },
}
FAST = {"timeout": (2.0, 5.0), "attempts": 3, "backoff": 0.01, "log": lambda line: None}


# ---------------------------------------------------------------------------------- the server
class Server(ThreadingHTTPServer):
    """Serves `files` by path (query included), with Range support; paths in `drop_once` send half
    their body on the first GET and close the connection; `redirects` answer 302 (with `headers`,
    as Hugging Face does with X-Linked-Etag). Every request is recorded."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def hits(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: Server = self.server
        srv.requests.append((self.path, dict(self.headers)))
        extra = srv.headers.get(self.path, {})
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        start = int(self.headers["Range"][len("bytes=") : -1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.path in srv.drop_once:
            srv.drop_once.discard(self.path)
            self.wfile.write(data[start : len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent():
    """A server that accepts connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    for task, counts in COUNTS.items():
        sample_data.write(task, root / task, seed=0, counts=counts)
    return root


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_gz(members: dict[str, Path | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, item in members.items():
            if isinstance(item, Path):
                tar.add(item, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(item)
                tar.addfile(info, io.BytesIO(item))
    return buf.getvalue()


def published_copy(task: str, sample: Path, server: Server, prefix: str = "/") -> list[Remote]:
    """Serve the sample data as the task's real download list describes it (same URLs, archive
    structure, unpack rules); the entries come back pinned to what is served."""
    _, remotes = download.read_list(download.task_list(task))
    entries = []
    for remote in remotes:
        content = CONTENT[task][remote.url]
        if remote.unpack == "file":
            data = (sample / content[0]).read_bytes()
        else:
            top = [p for p in remote.only.split("/") if p]
            top += ["top"] * (remote.strip - len(top))
            members = {}
            for rel in content:
                for path in sorted([sample / rel, *(sample / rel).rglob("*")]):
                    members["/".join([*top, path.relative_to(sample).as_posix()])] = path
            if top:  # a sibling the list must skip (e.g. biomass' other data splits)
                members["/".join([*top[:-1], "other_split", "train_images", "x_img.tif"])] = b"decoy"
            for folder in [m for m in members if m.endswith("_chips")]:
                members[f"{folder}/._chip_000_000_merged.tif"] = b"macOS metadata"  # as in the crop archives
            data = tar_gz(members)
        server.files[prefix + remote.url] = data
        entries.append(replace(remote, sha256=sha256(data), size=len(data), checksums=None))
    return entries


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def nothing_left(dest: Path, cache: Path):
    assert not dest.exists()
    assert not list(dest.parent.glob(f".{dest.name}.partial*"))
    assert not list(cache.rglob("*.part"))


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("task", ["crop", "burn_scars", "biomass"])
def test_happy_download_unpacks_into_the_task_layout(task, server, samples, tmp_path):
    entries = published_copy(task, samples / task, server, prefix=f"/{task}/")
    dest = tmp_path / "data" / task
    lines = []
    fetched = download.fetch(
        entries, server.url + f"{task}/", dest, tmp_path / "cache", check=TASKS[task].check_layout, log=lines.append
    )
    assert TASKS[task].check_layout(dest) is None
    assert tree(dest) == tree(samples / task) | {download.RECORD}  # no macOS twins, no other splits
    assert [f.verified_by for f in fetched] == ["pinned sha256"] * len(entries)
    record = json.loads((dest / download.RECORD).read_text())
    assert [f["sha256"] for f in record["files"]] == [e.sha256 for e in entries]
    assert any("dataset ready" in line for line in lines)


def test_plain_files_land_in_their_folders(server, samples, tmp_path):
    """Landslide4Sense is published as loose files: the real list's entries for the sample's files."""
    sample = samples / "landslide"
    _, remotes = download.read_list(download.task_list("landslide"))
    entries = []
    for remote in remotes:
        if (sample / remote.url).is_file():
            data = (sample / remote.url).read_bytes()
            server.files["/landslide/" + remote.url] = data
            entries.append(replace(remote, sha256=sha256(data)))
    assert len(entries) == len(tree(sample))
    dest = tmp_path / "landslide"
    download.fetch(
        entries, server.url + "landslide/", dest, tmp_path / "cache", check=TASKS["landslide"].check_layout, **FAST
    )
    assert tree(dest) == tree(sample) | {download.RECORD}


def test_resumes_after_the_server_drops_the_connection(server, samples, tmp_path):
    entries = published_copy("biomass", samples / "biomass", server, prefix="/resume/")
    path = "/resume/" + entries[0].url
    server.drop_once.add(path)
    lines = []
    dest = tmp_path / "biomass"
    fast = {**FAST, "log": lines.append}
    download.fetch(
        entries, server.url + "resume/", dest, tmp_path / "cache", check=TASKS["biomass"].check_layout, **fast
    )
    first, second = server.hits(path)
    assert "Range" not in first
    offset = int(second["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= len(server.files[path]) // 2  # what had arrived (whole chunks) before the drop
    assert any("resuming at byte" in line for line in lines)
    assert TASKS["biomass"].check_layout(dest) is None


def test_checksum_mismatch_fails_in_one_line_and_leaves_nothing(server, samples, tmp_path):
    entries = published_copy("burn_scars", samples / "burn_scars", server, prefix="/bad/")
    actual = entries[0].sha256
    wrong = "0" * 64
    dest, cache = tmp_path / "burn_scars", tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        download.fetch([replace(entries[0], sha256=wrong)], server.url + "bad/", dest, cache, **FAST)
    message = str(e.value)
    assert "\n" not in message
    assert "hls_burn_scars.tar.gz: sha256 mismatch" in message and wrong in message and actual in message
    nothing_left(dest, cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # the bad file is deleted


def test_404_names_the_url_and_is_not_retried(server, tmp_path):
    dest, cache = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        download.fetch(
            [Remote("nowhere/missing.tar.gz", sha256="1" * 64, unpack="tar.gz")], server.url, dest, cache, **FAST
        )
    assert str(e.value) == f"GET {server.url}nowhere/missing.tar.gz: HTTP 404 Not Found"
    assert len(server.hits("/nowhere/missing.tar.gz")) == 1
    nothing_left(dest, cache)


def test_a_server_that_never_answers_times_out(silent, tmp_path):
    dest, cache = tmp_path / "data", tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        download.fetch(
            [Remote("a.tar.gz", sha256="1" * 64)], silent, dest, cache, **{**FAST, "timeout": (1.0, 0.5), "attempts": 2}
        )
    assert time.monotonic() - start < 10
    assert (
        str(e.value)
        == f"GET {silent}a.tar.gz: no answer within 0.5 s (read timeout) after 2 attempt(s); run again to resume"
    )
    nothing_left(dest, cache)


def test_unpinned_files_need_trust_then_are_pinned(server, tmp_path):
    """Hugging Face style: the resolve URL redirects with the LFS sha256 in X-Linked-Etag."""
    data = tar_gz({"training_data.txt": b"chip_001_001\n"})
    server.files["/cdn/blob1"] = data
    server.redirects["/hub/resolve/abc/small.tgz"] = "/cdn/blob1"
    server.headers["/hub/resolve/abc/small.tgz"] = {"X-Linked-Etag": f'"{sha256(data)}"', "X-Repo-Commit": "abc"}
    entry = Remote("small.tgz", unpack="tgz")
    base, cache, pins = server.url + "hub/resolve/abc/", tmp_path / "cache", tmp_path / "pins.json"
    with pytest.raises(DownloadError, match=r"^1 file\(s\) have no pinned sha256 \(first: small.tgz\)"):
        download.fetch([entry], base, tmp_path / "a", cache, pins=pins, **FAST)
    assert not server.hits("/hub/resolve/abc/small.tgz")  # refused before any request

    (got,) = download.fetch([entry], base, tmp_path / "a", cache, trust_published=True, pins=pins, **FAST)
    assert got.verified_by == "sha256 published by the host" and got.commit == "abc"
    assert json.loads(pins.read_text())[base + "small.tgz"]["sha256"] == sha256(data)

    (again,) = download.fetch([entry], base, tmp_path / "b", cache, pins=pins, **FAST)  # pinned now
    assert again.verified_by == "pinned sha256 (cached)"
    assert len(server.hits("/hub/resolve/abc/small.tgz")) == 1
    assert (tmp_path / "b" / "training_data.txt").read_bytes() == b"chip_001_001\n"


def test_published_checksums_are_checked(server, tmp_path):
    """A wrong published sha256 fails; Zenodo style: the md5 listed by the records API."""
    data = tar_gz({"x.txt": b"x"})
    server.files["/cdn/blob2"] = data
    server.redirects["/hub2/big.tgz"] = "/cdn/blob2"
    server.headers["/hub2/big.tgz"] = {"X-Linked-Etag": "f" * 64}
    with pytest.raises(
        DownloadError, match=f"big.tgz: sha256 \\(published by the host\\) mismatch: expected {'f' * 64}"
    ):
        download.fetch(
            [Remote("hub2/big.tgz", unpack="tgz")],
            server.url,
            tmp_path / "a",
            tmp_path / "c",
            trust_published=True,
            **FAST,
        )

    server.files["/records/7/files/z.tar.gz?download=1"] = data
    listing = {"files": [{"key": "z.tar.gz", "checksum": "md5:" + hashlib.md5(data).hexdigest()}]}
    server.files["/api/records/7"] = json.dumps(listing).encode()
    entry = Remote("records/7/files/z.tar.gz?download=1", unpack="tar.gz", checksums="api/records/7")
    (got,) = download.fetch([entry], server.url, tmp_path / "b", tmp_path / "c", trust_published=True, **FAST)
    assert got.verified_by == "md5 published by the host"
    with pytest.raises(DownloadError, match="z.tar.gz: no pinned sha256 and the host publishes no checksum"):
        download.fetch(
            [replace(entry, checksums=None)], server.url, tmp_path / "d", tmp_path / "e", trust_published=True, **FAST
        )


@pytest.mark.parametrize(
    "member, link",
    [("../evil.txt", None), ("/tmp/evil.txt", None), ("data/link", "../../outside"), ("data/abs", "/etc")],
)
def test_archive_members_that_escape_are_refused(member, link, server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    data = buf.getvalue()
    server.files["/evil.tar.gz"] = data
    dest, cache = tmp_path / "x" / "data", tmp_path / "cache"
    with pytest.raises(DownloadError, match="refusing .*points outside the destination"):
        download.fetch([Remote("evil.tar.gz", sha256=sha256(data), unpack="tar.gz")], server.url, dest, cache, **FAST)
    nothing_left(dest, cache)
    assert not (tmp_path / "x" / "evil.txt").exists()


def test_zip_archives_and_a_layout_the_task_rejects(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("top/folder/", "")
        zf.writestr("top/folder/a.txt", "a")
        zf.writestr("__MACOSX/top/folder/._a.txt", "metadata")
    data = buf.getvalue()
    server.files["/z.zip"] = data
    entry = Remote("z.zip", sha256=sha256(data), unpack="zip", into="sub", strip=1)
    dest, cache = tmp_path / "data", tmp_path / "cache"
    download.fetch([entry], server.url, dest, cache, **FAST)
    assert tree(dest) == {"sub/folder/a.txt", download.RECORD}
    problem = (
        f"^the downloaded files are not the layout the task reads: missing folder {tmp_path / 'crop'}/training_chips"
    )
    with pytest.raises(DownloadError, match=problem):
        download.fetch([entry], server.url, tmp_path / "crop", cache, check=TASKS["crop"].check_layout, **FAST)
    nothing_left(tmp_path / "crop", cache)


def test_weights_are_verified_and_cached_by_hub_id_file_and_revision(server, tmp_path):
    weights = b"not really a checkpoint" * 1000
    path = "/ibm-nasa-geospatial/Prithvi-test/resolve/v1/Prithvi_test.pt"
    server.files["/cdn/weights"] = weights
    server.redirects[path] = "/cdn/weights"
    server.headers[path] = {"X-Linked-Etag": sha256(weights), "X-Repo-Commit": "c0ffee"}
    args = ("ibm-nasa-geospatial/Prithvi-test", "Prithvi_test.pt", tmp_path / "weights")
    with pytest.raises(DownloadError, match="no pinned sha256"):
        download.fetch_weights(*args, endpoint=server.url, revision="v1", **FAST)
    pins = tmp_path / "pins.json"
    got = download.fetch_weights(*args, endpoint=server.url, revision="v1", trust_published=True, pins=pins, **FAST)
    assert got.path == tmp_path / "weights" / "ibm-nasa-geospatial--Prithvi-test" / "v1" / "Prithvi_test.pt"
    assert got.path.read_bytes() == weights and got.sha256 == sha256(weights) and got.commit == "c0ffee"
    again = download.fetch_weights(*args, endpoint=server.url, revision="v1", pins=pins, **FAST)
    assert again.verified_by == "pinned sha256 (cached)" and len(server.hits(path)) == 1
    with pytest.raises(
        DownloadError, match=f"Prithvi_test.pt: sha256 mismatch: expected {'2' * 64}, got {sha256(weights)}"
    ):
        download.fetch_weights(*args, endpoint=server.url, revision="v1", sha256="2" * 64, **FAST)
    assert not got.path.exists() and not list((tmp_path / "weights").rglob("*.part"))


def test_the_download_lists():
    """Every task has a list; Hugging Face URLs pin a revision; Landslide4Sense's 9,688 files."""
    assert sorted(p.stem for p in download.LISTS.glob("*.yaml")) == sorted(TASKS)
    for task in TASKS:
        base, remotes = download.read_list(download.task_list(task))
        if "huggingface.co" in base:
            assert "/resolve/" in base and len(base.rstrip("/").rsplit("/", 1)[1]) == 40
        assert remotes and all(r.sha256 or r.checksums or "huggingface.co" in base for r in remotes)
    _, landslide = download.read_list(download.task_list("landslide"))
    assert len(landslide) == 2 * (3799 + 245 + 800)
    assert all(Path(r.url).parent.as_posix() == r.into for r in landslide)
    assert landslide[-1].url == "annotations/test/mask_800.h5"


def test_workflow_downloads_a_dataset_verified_into_the_layout_it_reads(server, samples, tmp_path, shared_cache):
    """`tasks.crop.download: true`: the fetch_data rule downloads the published files (here a mirror
    on loopback with its own list, given through configuration), verifies and unpacks them, and the
    dataset passes the task's validation."""
    import dataclasses

    from conftest import run_snakemake, write_config

    entries = published_copy("crop", samples / "crop", server, prefix="/mirror/")
    listed = tmp_path / "crop-mirror.yaml"
    listed.write_text(yaml.safe_dump({"base_url": "unused", "files": [
        {k: v for k, v in dataclasses.asdict(e).items() if v not in (None, "", 0) or k == "url"} for e in entries
    ]}))  # fmt: skip
    tasks = {name: {"enabled": False} for name in TASKS}
    tasks["crop"] = {"download": True}
    config = write_config(tmp_path / "config.yaml", experiment="dl", tasks=tasks, cache_dir=str(tmp_path / "cache"),
                          downloads={"base_urls": {"crop": server.url + "mirror/"}, "lists": {"crop": str(listed)},
                                     "trust_published": False, "timeout": [2, 5], "attempts": 2})  # fmt: skip
    (tmp_path / "cache").mkdir()
    for snapshot in shared_cache.glob("terratorch-registry-*.json"):
        (tmp_path / "cache" / snapshot.name).write_bytes(snapshot.read_bytes())
    result = run_snakemake(tmp_path, "--cores", "1", "results/dl/out/datasets/crop.json", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "cache" / "datasets" / "crop"
    assert TASKS["crop"].check_layout(data) is None
    assert tree(data) - {".geofm-download.json", ".snakemake_timestamp"} == tree(samples / "crop")
    manifest = json.loads((tmp_path / "results" / "dl" / "out" / "datasets" / "crop.json").read_text())
    assert manifest["validation"]["errors"] == [] and manifest["validation"]["checked_files"] > 0
    assert any(h.get("Range") is None for h in server.hits("/mirror/" + entries[0].url))
