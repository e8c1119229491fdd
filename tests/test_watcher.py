"""The watcher's parts against real services (SeaweedFS with auth, git, DVC), no workflow run:
leases, queue order, outages, versioning with a moved branch, submissions as data, idle cost."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import botocore.exceptions
import pytest
import services as sv
import yaml

from geofm import cos, versioning
from geofm.watcher import Settings, Watcher, path_problem

META = {"commit": "0" * 40, "branch": "main", "config_path": "config/config.yaml", "experiment": "x"}


@pytest.fixture(scope="module")
def credentials():
    return sv.make_credentials()


@pytest.fixture(scope="module")
def s3(tmp_path_factory, credentials):
    server = sv.SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), credentials)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(monkeypatch, credentials, s3):
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    return credentials


@pytest.fixture
def store(env, s3, request):
    return cos.Store(s3.bucket, f"t/{request.node.name}", s3.endpoint)


def watcher(store, tmp_path, name, **kw) -> Watcher:
    return Watcher(Settings(repo=tmp_path, home=tmp_path / f"home-{name}", store=store, name=name, **kw))


def test_server_checks_credentials(s3, credentials):
    bad = s3.client(AWS_ACCESS_KEY_ID=credentials["AWS_ACCESS_KEY_ID"], AWS_SECRET_ACCESS_KEY="wrong-secret-value")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        bad.list_objects_v2(Bucket=s3.bucket)
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")
    s3.client().list_objects_v2(Bucket=s3.bucket)  # the right ones work


def test_exactly_one_of_many_claims_wins(store, tmp_path):
    sid = store.submit(b"experiment: x\n", META)
    watchers = [watcher(store, tmp_path, f"w{i}") for i in range(8)]
    barrier, leases = threading.Barrier(len(watchers)), [None] * len(watchers)

    def claim(i):
        barrier.wait()
        leases[i] = watchers[i].claim(sid)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(watchers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(lease is not None for lease in leases) == 1
    holder = json.loads(store.get(store.key(sid, "lease.json"))[0])
    assert holder["owner"] == f"w{next(i for i, lease in enumerate(leases) if lease)}"


def test_live_lease_kept_stale_lease_taken_over_by_exactly_one(store, tmp_path):
    sid = store.submit(b"experiment: x\n", META)
    a = watcher(store, tmp_path, "a", lease_ttl_s=1.5)
    lease = a.claim(sid)
    assert lease is not None
    b, c = watcher(store, tmp_path, "b"), watcher(store, tmp_path, "c")
    for _ in range(4):  # a renews (as its heartbeat does): never stale for b
        assert b.claim(sid) is None
        time.sleep(0.6)
        lease.etag = store.put(lease.key, a._lease_body(lease.token), if_match=lease.etag)
    assert b.claim(sid) is None and c.claim(sid) is None  # both start observing the last ETag
    time.sleep(2.0)  # no renewal for longer than the lease's TTL
    won = [None, None]
    barrier = threading.Barrier(2)

    def take(i, w):
        barrier.wait()
        won[i] = w.claim(sid)

    threads = [threading.Thread(target=take, args=(i, w)) for i, w in enumerate((b, c))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(x is not None for x in won) == 1
    with pytest.raises(cos.PreconditionFailed):  # a's next renewal fails: it has lost the run
        store.put(lease.key, a._lease_body(lease.token), if_match=lease.etag)


def test_renewed_lease_is_never_stale_and_a_lost_one_stops_the_holder(store, tmp_path):
    sid = store.submit(b"experiment: x\n", META)
    a, b = watcher(store, tmp_path, "a", lease_ttl_s=1.2), watcher(store, tmp_path, "b")
    lease = a.claim(sid)
    done = threading.Event()
    beat = threading.Thread(target=a._heartbeat, args=(sid, lease, done), daemon=True)
    beat.start()
    try:
        for _ in range(6):  # 3 s, well past the TTL: the heartbeat keeps it fresh
            assert b.claim(sid) is None
            time.sleep(0.5)
        assert not a.lost.is_set()
        for _ in range(20):  # taken over behind its back (e.g. after a partition)
            _, etag = store.get_json(lease.key)
            try:  # the heartbeat may renew between our read and write: read again then
                store.put(lease.key, b._lease_body("someone-else"), if_match=etag)
                break
            except cos.PreconditionFailed:
                continue
        else:
            pytest.fail("could not take the lease over in 20 tries")
        sv.wait_for(a.lost.is_set, 10, what="the holder to notice")
    finally:
        done.set()
        beat.join(10)


def test_restarted_watcher_takes_its_own_dead_lease_at_once(store, tmp_path):
    sid = store.submit(b"experiment: x\n", META)
    gone = subprocess.Popen(["true"])
    gone.wait()
    old = watcher(store, tmp_path, "node1")
    old.pid = gone.pid  # the lease of a crashed process of the same watcher
    assert old.claim(sid) is not None
    assert watcher(store, tmp_path, "other", lease_ttl_s=600).claim(sid) is None
    restarted = watcher(store, tmp_path, "node1", lease_ttl_s=600)
    assert restarted.claim(sid) is not None
    assert json.loads(store.get(store.key(sid, "lease.json"))[0])["pid"] == os.getpid()


def test_queue_is_in_submission_order_and_finished_ones_drop_out(store, tmp_path):
    sids = [store.submit(f"experiment: e{i}\n".encode(), META) for i in range(3)]
    assert store.queued() == sids
    status = store.status(sids[0])
    assert status["state"] == "queued" and status["submitted_at"]
    store.put_json(store.key(sids[0], "status.json"), {**status, "state": "succeeded"})
    assert watcher(store, tmp_path, "w").claim(sids[0]) is None  # finished before a crash: cleaned up
    assert store.queued() == sids[1:]


def test_unreachable_store_is_an_outage_not_a_crash(env):
    dead = cos.Store("geofm-test", "x", f"http://127.0.0.1:{sv.free_ports(1)[0]}")
    with pytest.raises(cos.Unavailable):
        dead.queued()
    waits: list[str] = []
    stop = threading.Event()
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 4:
            return dead.queued()
        return "ok"

    assert cos.retrying(flaky, stop=stop, log=waits.append, first=0.2, cap=5) == "ok"
    delays = [float(w.split("retrying in ")[1].split()[0]) for w in waits]
    assert len(delays) == 3 and delays[0] < delays[1] < delays[2]  # exponential backoff


def test_output_paths_must_stay_in_the_run_folder():
    ok = {"experiment": "e1", "results_dir": "results", "scratch_dir": "scratch", "cache_dir": "resources/cache",
          "sample_data": {"root": "resources/sample_data"}}  # fmt: skip
    assert path_problem(ok) is None
    for key, bad in [("results_dir", "/home/user"), ("scratch_dir", "../other"), ("cache_dir", "~/x"),
                     ("experiment", "../escape"), ("experiment", "a; rm -rf /")]:  # fmt: skip
        assert path_problem({**ok, key: bad}), (key, bad)
    assert path_problem({**ok, "sample_data": {"root": "/tmp/x"}})


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3):
    """A bare 'GitLab' remote with this project and a clone for the watcher."""
    root = tmp_path_factory.mktemp("project")
    bare = sv.seed_remote(root, s3)
    return bare, sv.clone(bare, root / "watcher-repo", "Watcher")


def test_submitted_values_are_data(project, store, tmp_path):
    """Hostile metadata or configs fail the submission before anything runs or is written."""
    bare, repo = project
    user = sv.clone(bare, tmp_path / "user")
    (user / "config/config.yaml").write_text(yaml.safe_dump({"experiment": "evil", "results_dir": "/tmp/geofm-evil"}))
    sv.sh("git", "commit", "-qam", "evil paths", cwd=user)
    sv.sh("git", "push", "-q", "origin", "HEAD:refs/heads/evil", cwd=user)
    commit = sv.sh("git", "rev-parse", "HEAD", cwd=user).stdout.strip()
    config = (user / "config/config.yaml").read_bytes()
    marker = tmp_path / "PWNED"
    cases = {
        "branch": ({**META, "commit": commit, "branch": f"main;touch {marker}"}, config, "not a plain branch name"),
        "commit": ({**META, "commit": f"$(touch {marker})", "branch": "evil"}, config, "not a full commit id"),
        "path": (
            {**META, "commit": commit, "branch": "evil", "config_path": "../../etc/x.yaml"},
            config,
            "config path",
        ),
        "tampered": ({**META, "commit": commit, "branch": "evil"}, b"experiment: other\n", "differs from"),
        "escape": ({**META, "commit": commit, "branch": "evil"}, config, "results_dir"),
    }
    w = watcher(store, tmp_path, "w", snakemake="/bin/false")
    w.s.repo = repo
    for name, (meta, text, expected) in cases.items():
        sid = store.submit(text, meta)
        lease = w.claim(sid)
        w.process(sid, lease)
        status = store.status(sid)
        assert status["state"] == "failed", name
        assert expected in status["message"], (name, status["message"])
        assert not store.exists(store.queue_key(sid)), name
    assert not marker.exists()
    assert not Path("/tmp/geofm-evil").exists()
    assert not list((w.s.home / "logs").glob("*.log")), "nothing reached snakemake"


def _experiment(folder: Path, stale: bool = False) -> None:
    (folder / "out").mkdir(parents=True)
    (folder / "out" / "summary.csv").write_text("task,status\nbiomass,ok\n")
    (folder / "out" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n\0binary")
    (folder / "err").mkdir()
    (folder / ("err/old.err" if stale else "err/biomass.err")).write_text("cause: stale\n" if stale else "cause: x\n")
    (folder / "predictions").mkdir()
    (folder / "predictions" / "chip.png").write_bytes(os.urandom(2048))


def test_results_push_retried_onto_a_moved_branch(project, env, tmp_path):
    bare, _ = project
    work = sv.clone(bare, tmp_path / "work")
    other = sv.clone(bare, tmp_path / "other", "Colleague")
    config_commit = sv.sh("git", "rev-parse", "HEAD", cwd=work).stdout.strip()
    # Meanwhile the branch moves: a colleague's commit, which also holds an older run's file.
    _experiment(other / "results" / "exp", stale=True)
    sv.sh("git", "add", "-f", "results/exp/err/old.err", cwd=other)
    (other / "NOTES.txt").write_text("a colleague's change\n")
    sv.sh("git", "add", "NOTES.txt", cwd=other)
    sv.sh("git", "commit", "-qm", "colleague", cwd=other)
    sv.sh("git", "push", "-q", "origin", "HEAD:main", cwd=other)
    moved = sv.sh("git", "rev-parse", "HEAD", cwd=other).stdout.strip()

    _experiment(work / "results" / "exp")
    lines: list[str] = []
    settings = {"branch": "main", "config_commit": config_commit, "submission": "", "retry_delay_s": 0.1}
    done = versioning.version(work, Path("results/exp"), experiment="exp", outcome="succeeded", settings=settings,
                              receipt=tmp_path / "receipt.json", log=lines.append)  # fmt: skip
    log = "\n".join(lines)
    assert "push rejected" in log and moved[:10] in log
    head = sv.sh("git", "rev-parse", "main", cwd=bare).stdout.strip()
    assert done["results_commit"] == head
    assert sv.sh("git", "rev-parse", f"{head}^", cwd=bare).stdout.strip() == moved
    tree = sv.sh("git", "ls-tree", "-r", "--name-only", head, cwd=bare).stdout.split()
    assert "NOTES.txt" in tree  # the colleague's work is kept
    assert "results/exp/err/old.err" not in tree  # but not the older run's files
    assert {"results/exp/out/summary.csv", "results/exp/err/biomass.err", "results/exp/predictions.dvc",
            "results/exp/out/curves.png.dvc", "results/exp/submission.json"} <= set(tree)  # fmt: skip
    assert "results/exp/out/curves.png" not in tree  # binary: DVC, not git
    message = sv.sh("git", "log", "-1", "--format=%B", head, cwd=bare).stdout
    assert f"Config-Commit: {config_commit}" in message and "Geofm-Results: exp" in message

    # A rerun (e.g. after a crash before the receipt was written) makes no second commit.
    again = versioning.version(work, Path("results/exp"), experiment="exp", outcome="succeeded", settings=settings,
                               receipt=tmp_path / "receipt2.json", log=lambda _: None)  # fmt: skip
    assert again["results_commit"] == head == sv.sh("git", "rev-parse", "main", cwd=bare).stdout.strip()

    # A fresh clone restores the same bytes.
    fresh = sv.clone(bare, tmp_path / "fresh")
    sv.sh(sv.VENV_BIN / "dvc", "pull", "--quiet", cwd=fresh, env=env)
    for f in (work / "results/exp").rglob("*"):
        if f.is_file():
            assert (fresh / f.relative_to(work)).read_bytes() == f.read_bytes(), f
    assert env["AWS_SECRET_ACCESS_KEY"] not in (fresh / ".dvc" / "config").read_text()


def test_versioning_refuses_git_ignored_dvc_files(project, tmp_path):
    bare, _ = project
    work = sv.clone(bare, tmp_path / "work")
    (work / ".gitignore").write_text("results/\n")
    _experiment(work / "results" / "ignored")
    with pytest.raises(versioning.VersioningError, match="git-ignored"):
        versioning.version(work, Path("results/ignored"), experiment="ignored", outcome="failed",
                           settings={"branch": "main"}, receipt=tmp_path / "r.json", log=lambda _: None)  # fmt: skip


def test_idle_watcher_is_cheap_and_stops_on_sigterm(s3, env, tmp_path):
    repo = tmp_path / "repo"
    sv.sh("git", "init", "-q", repo, cwd=tmp_path)
    w = sv.WatcherProcess("idle", repo, tmp_path / "home", {**env}, s3, poll=1, prefix="idle").start()
    try:
        sv.wait_for(lambda: "watching" in w.text(), 30, what="the watcher to start")

        def cpu_s():
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before, start = cpu_s(), time.monotonic()
        time.sleep(10)
        share = (cpu_s() - before) / (time.monotonic() - start)
        print(f"\nidle watcher, polling every 1 s: {100 * share:.2f}% of one core")
        assert share < 0.03
    finally:
        assert w.stop(timeout=30) == 0
    assert "stopped" in w.text()
