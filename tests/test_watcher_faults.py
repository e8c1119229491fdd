"""The watcher's fault matrix, against real services: SeaweedFS with the operator's key split,
a bare git remote, real DVC, a JWKS on loopback, geofm-watcher processes and real Snakemake.

The submitted commits sit on a `fast` branch whose Snakefile is a stand-in
(tests/fake_workflow/Snakefile): the real config, results layout and version rules, one cell
that takes seconds. Each test uses its own key prefix (its own queue) and watcher homes; each
asserts that nothing was lost and nothing ran twice: one results commit per submission on
the branch, one Snakemake run of it (resumed runs say so), its final status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import services as sv
import yaml

from geofm.store import Store

pytestmark = pytest.mark.e2e

FAST = "fast"
BIOMASS_ONLY = {
    "crop": {"enabled": False},
    "landslide": {"enabled": False},
    "biomass": {"overrides": {"max_epochs": 1}},
}


def experiment(name: str, description: str = "", **overrides) -> dict:
    return {"experiment": name, "description": description, **sv.EXPERIMENT_BASE, "tasks": BIOMASS_ONLY, **overrides}


class Faults:
    def __init__(self, root: Path, snapshot: Path):
        self.root = root
        self.admin = sv.make_credentials()
        self.keys = sv.KeySplit(self.admin)
        self.s3 = sv.SeaweedFS(root / "seaweedfs", self.admin, identities=self.keys.identities())
        self.jwks = sv.Jwks()
        self.cache, self.scratch = root / "shared-cache", root / "shared-scratch"
        sv.seed_registry(self.cache, snapshot)
        self.homes: list[Path] = []
        self.procs: list[sv.WatcherProcess] = []

    def start(self) -> None:
        self.s3.start()
        self.bare = sv.seed_remote(self.root, self.s3)
        self.user = sv.clone(self.bare, self.root / "user")
        shutil.copy2(sv.REPO / "tests" / "fake_workflow" / "Snakefile", self.user / "Snakefile")
        sv.sh("git", "commit", "-qam", "a stand-in workflow that takes seconds", cwd=self.user)
        sv.sh("git", "push", "-q", "origin", f"HEAD:refs/heads/{FAST}", cwd=self.user)

    def close(self) -> None:
        for w in self.procs:
            if w.alive():
                w.stop(timeout=30)
        self.s3.stop()
        self.jwks.close()

    def store(self, prefix: str, key: dict | None = None) -> Store:
        return Store(self.s3.bucket, prefix, self.s3.endpoint, credentials=key or self.admin)

    def commit(self, config: dict, branch: str = FAST) -> tuple[str, bytes]:
        text = yaml.safe_dump(config, sort_keys=False).encode()
        sv.sh("git", "fetch", "-q", "origin", cwd=self.user)
        sv.sh("git", "checkout", "-q", "-B", branch, f"origin/{branch}", cwd=self.user)
        (self.user / "config" / "config.yaml").write_bytes(text)
        sv.sh("git", "commit", "-qam", f"experiment {config['experiment']}", cwd=self.user)
        sv.sh("git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.user)
        return sv.sh("git", "rev-parse", "HEAD", cwd=self.user).stdout.strip(), text

    def submit(self, prefix: str, commit: str, text: bytes, branch: str = FAST, token: str | None = None,
               **meta) -> str:  # fmt: skip
        """As the submit job does, with CI's key."""
        token = self.jwks.mint(commit, branch) if token is None else token
        doc = {"commit": commit, "branch": branch, "config_path": "config/config.yaml", "id_token": token, **meta}
        return self.store(prefix, self.keys.ci).submit(text, doc)

    def watcher(self, name: str, prefix: str, **options) -> sv.WatcherProcess:
        home = self.root / f"{prefix.replace('/', '-')}-{name}"
        repo = home.parent / f"{home.name}-clone"
        if not repo.exists():
            sv.clone(self.bare, repo, f"Watcher {name}")
        options = {"prefix": prefix, **self.jwks.watcher_args(), "cache-root": self.cache,
                   "scratch-root": self.scratch, **options}  # fmt: skip
        w = sv.WatcherProcess(name, repo, home, self.keys.watcher_env(), self.s3, **options)
        self.procs.append(w)
        return w

    def status(self, prefix: str, sid: str) -> dict | None:
        try:
            return json.loads(self.store(prefix).get(f"{prefix}/status/{sid}.json")[0])
        except (KeyError, Exception):  # noqa: BLE001 - absent, or the store is down on purpose
            return None

    def wait_state(self, prefix: str, sid: str, states=("succeeded", "failed", "cancelled"), timeout=180) -> dict:
        return sv.wait_for(lambda: (s := self.status(prefix, sid)) and s["state"] in states and s, timeout,
                           what=f"{sid} to reach {states}")  # fmt: skip

    def results_commits(self, sid: str, branch: str = FAST) -> list[str]:
        out = sv.sh("git", "log", "--format=%H", "-F", f"--grep=Submission: {sid}", branch, cwd=self.bare).stdout
        return out.split()

    @staticmethod
    def runs(w: sv.WatcherProcess, sid: str) -> int:
        """Snakemake runs of the workflow itself (not --unlock, not version_evidence) for sid."""
        log = w.home / "runs" / sid / "snakemake.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return sum(
            1 for line in lines if line.startswith("### ") and "version_evidence" not in line and "--unlock" not in line
        )


@pytest.fixture(scope="module")
def faults(tmp_path_factory, shared_cache):
    with sv.running(Faults(tmp_path_factory.mktemp("faults"), sv.registry_file(shared_cache))) as f:
        yield f


def snakemake_pids(sid: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if sid.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def rename(path: Path, away: bool) -> None:
    """A git outage: the remote's path disappears (and comes back)."""
    gone = path.with_name(path.name + ".unreachable")
    os.rename(*((path, gone) if away else (gone, path)))


# ------------------------------------------------------------------------------------------------
def test_a_run_publishes_its_results_and_leaks_no_credential(faults):
    prefix = "t/happy"
    marker = faults.root / "planted-hook-ran"
    commit, text = faults.commit(experiment("happy", description=f"plant marker={marker} sleep=1"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix).start()
    status = faults.wait_state(prefix, sid)
    w.stop()
    assert status["state"] == "succeeded", (status, w.text()[-4000:])
    assert status["submitted_by"] == "researcher"  # from the verified token
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(w, sid) == 1
    # The child's environment (committed as out/env.json): no credential, by value or by name.
    env = json.loads(
        sv.sh("git", "show", f"{status['results_commit']}:results/happy/out/env.json", cwd=faults.bare).stdout
    )
    dumped = json.dumps(env)
    for secret in faults.keys.secrets():
        assert secret not in dumped
    assert not [k for k in env if k.startswith(("AWS_", "GEOFM_GIT", "GEOFM_DVC", "CI_"))], sorted(env)
    assert env["PYTHONPATH"] == str(w.home / "runs" / sid / "checkout")
    # The hooks and fsmonitor the run planted in its checkout ran (if at all) only as the run.
    if marker.exists():
        for secret in faults.keys.secrets():
            assert secret not in marker.read_text(), "a planted hook ran with the watcher's credentials"
    # Its own checkout, not the watcher's clone; checkpoints and receipts in the shared scratch.
    checkout = w.home / "runs" / sid / "checkout"
    assert (checkout / ".git").is_dir() and not (checkout / ".git" / "objects" / "info" / "alternates").exists()
    assert (faults.scratch / sid / "happy" / "versioning" / "version.json").is_file()
    # The DVC objects went to the operator's remote (restoring them: tests/test_ci_pipeline.py).
    chip = hashlib.md5((checkout / "results/happy/predictions/chip.bin").read_bytes()).hexdigest()
    assert f"dvc/files/md5/{chip[:2]}/{chip[2:]}" in faults.s3.keys("dvc/")


def test_git_outage_at_checkout_requeues_sigterm_included_and_the_run_happens_once(faults):
    prefix = "t/git-checkout"
    commit, text = faults.commit(experiment("gitout", description="nodvc"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix, **{"max-backoff": 2})
    rename(faults.bare, away=True)
    try:
        w.start()
        sv.wait_for(lambda: w.text().count("git fetch fast failed") >= 2, 60, what="fetch retries")
        assert w.stop(timeout=60) == 0  # SIGTERM while the fetch is being retried
        status = faults.status(prefix, sid)
        assert status["state"] == "queued" and "interrupted" in status["message"], status
        assert not faults.store(prefix).exists(f"{prefix}/leases/{sid}.json")
        assert faults.store(prefix).queued() == [sid]
        # Restarted while the remote is still away: it keeps retrying (queued, never failed) ...
        w.start()
        sv.wait_for(lambda: w.text().count("git fetch fast failed") >= 4, 60, what="more fetch retries")
        assert faults.status(prefix, sid)["state"] in ("queued", "running")
    finally:
        rename(faults.bare, away=False)
    # ... and runs it once the remote is back.
    status = faults.wait_state(prefix, sid)
    w.stop()
    assert status["state"] == "succeeded", status
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(w, sid) == 1
    assert "failed" not in [h["state"] for h in status["history"]]


def test_git_outage_at_push_keeps_the_results_and_pushes_them_later(faults):
    prefix = "t/git-push"
    commit, text = faults.commit(experiment("pushout", description="sleep=4"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix, **{"max-backoff": 2, "push-within": 6}).start()
    sv.wait_for(lambda: (s := faults.status(prefix, sid)) and s.get("snakemake_started_at"), 120, what="the run")
    rename(faults.bare, away=True)
    try:
        pending = sv.wait_for(lambda: (s := faults.status(prefix, sid)) and s.get("pending_publish") and s, 120,
                              what="the push to be deferred")  # fmt: skip
        assert pending["state"] == "queued" and "pushing them failed" in pending["message"], pending
        run_dir = w.home / "runs" / sid
        assert (run_dir / "pending.json").is_file()
        for i in range(12):  # more finished submissions than --keep-runs would keep: never pruned
            (w.home / "finished").mkdir(exist_ok=True)
            (w.home / "finished" / f"20260101T000000000000Z-{i:07x}-000000").touch()
        sv.wait_for(lambda: w.text().count("git push") >= 2 or w.text().count("git fetch fast failed") >= 2, 60,
                    what="a retried push")  # fmt: skip
    finally:
        rename(faults.bare, away=False)
    status = faults.wait_state(prefix, sid)
    w.stop()
    assert status["state"] == "succeeded" and not status["pending_publish"], status
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(w, sid) == 1  # pushed, not run again
    assert run_dir.is_dir() and not (run_dir / "pending.json").exists()


def test_s3_outage_mid_run_is_waited_out(faults):
    prefix = "t/s3-out"
    commit, text = faults.commit(experiment("s3out", description="nodvc sleep=12"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix, **{"lease-ttl": 180}).start()
    sv.wait_for(lambda: (s := faults.status(prefix, sid)) and s.get("snakemake_started_at"), 120, what="the run")
    faults.s3.stop()  # shorter than half the lease TTL (a restart under load can take 20 s): the holder keeps its run
    time.sleep(10)
    faults.s3.start()
    status = faults.wait_state(prefix, sid)
    w.stop()
    assert status["state"] == "succeeded", status
    assert "renewing the lease" in w.text() and "fencing" not in w.text()
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(w, sid) == 1


def test_sigkill_during_versioning_resumes_and_publishes_once(faults):
    prefix = "t/sigkill"
    commit, text = faults.commit(experiment("killed"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix).start()
    sv.wait_for(lambda: "pushing the results" in json.dumps(faults.status(prefix, sid) or {}), 120, interval=0.1,
                what="the publish")  # fmt: skip
    w.kill()  # a crash in the middle of pushing: no cleanup
    w.start()  # the same watcher (name, home) comes back
    status = faults.wait_state(prefix, sid)
    w.stop()
    assert status["state"] == "succeeded", status
    assert status["attempt"] == 2
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(w, sid) == 1  # the second attempt only pushed
    assert "previous holder (this watcher) is gone" in w.text()


def test_a_holder_that_cannot_renew_fences_itself_and_the_new_holder_runs_it_once(faults):
    prefix = "t/takeover"
    commit, text = faults.commit(experiment("takeover", description="nodvc sleep=10"))
    sid = faults.submit(prefix, commit, text)
    relay = sv.Relay(faults.s3.ports["s3.port"])
    ttl = {"lease-ttl": 6, "max-backoff": 2}
    a = faults.watcher("A", prefix, endpoint=relay.endpoint, **ttl).start()
    sv.wait_for(lambda: (s := faults.status(prefix, sid)) and s.get("snakemake_started_at"), 120, what="A's run")
    b = faults.watcher("B", prefix, **ttl).start()
    time.sleep(2)
    relay.cut()  # A alone loses the store: its renewals fail
    sv.wait_for(lambda: "fencing myself off" in a.text(), 30, what="A to fence itself")
    sv.wait_for(lambda: not snakemake_pids(str(a.home / "runs" / sid)), 60, what="A's run to stop")
    sv.wait_for(lambda: "took over the lease" in b.text(), 60, what="B to take over")
    relay.restore()
    status = faults.wait_state(prefix, sid, timeout=240)
    for w in (a, b):
        w.stop()
    assert status["state"] == "succeeded" and status["watcher"].startswith("B@"), status
    assert faults.results_commits(sid) == [status["results_commit"]]
    assert faults.runs(b, sid) == 1 and not (a.home / "runs" / sid / "pending.json").exists()
    assert f"{sid} back to the queue" not in a.text() or "holds the lease now" in a.text()
    assert "pushed" not in a.text()


def test_malformed_and_oversized_objects_are_quarantined_and_the_queue_goes_on(faults):
    prefix = "t/malformed"
    store = faults.store(prefix)
    commit, text = faults.commit(experiment("queue", description="nodvc"))
    expired = faults.jwks.mint(commit, FAST, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    broken = {}
    for name in ("lease-list", "lease-text", "lease-fields", "lease-huge", "status-list", "status-fields"):
        sid = faults.submit(prefix, commit, text, token=expired)  # valid otherwise; refused after the repair
        obj, how = name.split("-")
        key = f"{prefix}/{'leases' if obj == 'lease' else 'status'}/{sid}.json"
        body = {
            "list": b"[1, 2]",
            "text": b"not json {",
            "fields": b'{"owner": "x"}',
            "huge": b"{" + b" " * 70000 + b"}",
        }
        store.put(key, body[how])
        broken[sid] = name
    for name, meta, config in (
        ("submission-list", None, text),
        ("submission-fields", {"commit": commit}, text),
        ("config-huge", {}, b"experiment: x\n" + b"#" * 300_000),
    ):
        sid = faults.submit(prefix, commit, config)
        if meta is None:
            store.put(store.key(sid, "submission.json"), b"[]")
        elif meta:
            store.put_json(store.key(sid, "submission.json"), meta)
        broken[sid] = name
    good = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix).start()
    status = faults.wait_state(prefix, good, timeout=240)
    w.stop()
    assert status["state"] == "succeeded", status
    assert w.alive() is False and "Traceback" not in w.text()
    quarantined = store.list(f"{prefix}/quarantine/")
    for sid, name in broken.items():
        final = faults.status(prefix, sid)
        assert final["state"] == "failed", (name, final)
        what = name.split("-")[0]
        reasons = [k for k in quarantined if f"/{sid}/" in k and k.endswith(".reason.json")]
        if what in ("lease", "status", "submission", "config"):
            assert reasons, (name, quarantined)
        assert not store.exists(store.queue_key(sid))
    assert faults.runs(w, good) == 1 and sum(faults.runs(w, sid) for sid in broken) == 0


def test_deadline_stops_the_run(faults):
    prefix = "t/deadline"
    commit, text = faults.commit(experiment("late", description="nodvc sleep=300"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix, deadline=10, **{"stop-timeout": 5}).start()
    status = faults.wait_state(prefix, sid, timeout=120)
    w.stop()
    assert status["state"] == "failed" and "deadline" in status["message"], status
    assert not snakemake_pids(str(w.home / "runs" / sid))
    assert faults.results_commits(sid) == [] and faults.runs(w, sid) == 1


def test_a_cancelled_wait_job_stops_the_run(faults):
    prefix = "t/cancel"
    commit, text = faults.commit(experiment("cancelled", description="nodvc sleep=300"))
    sid = faults.submit(prefix, commit, text)
    w = faults.watcher("A", prefix, **{"stop-timeout": 5}).start()
    env = {**sv.BASE_ENV, **faults.keys.ci, "PYTHONPATH": str(sv.REPO), "S3_BUCKET": faults.s3.bucket,
           "S3_PREFIX": prefix, "S3_ENDPOINT_URL": faults.s3.endpoint}  # fmt: skip
    cmd = [sv.PYTHON, "-m", "geofm.cli.wait", sid, "--poll", "1", "--commit", commit, "--branch", FAST]
    wait = subprocess.Popen(cmd, cwd=faults.user, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sv.wait_for(lambda: (s := faults.status(prefix, sid)) and s.get("snakemake_started_at"), 120, what="the run")
    wait.send_signal(signal.SIGTERM)  # GitLab cancels the wait job
    out = wait.communicate(timeout=30)[0]
    assert wait.returncode == 128 + signal.SIGTERM and "asked the watcher to stop" in out, out
    status = faults.wait_state(prefix, sid, timeout=120)
    w.stop()
    assert status["state"] == "cancelled", status
    assert not snakemake_pids(str(w.home / "runs" / sid))
    assert faults.results_commits(sid) == [] and faults.runs(w, sid) == 1
    assert not faults.store(prefix).exists(faults.store(prefix).queue_key(sid))
