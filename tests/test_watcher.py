"""The watcher's parts against real services (SeaweedFS with the operator's key split, a bare
git remote, DVC, a JWKS on loopback), in this process and without a workflow run: the attacks
of issue 9 refused before anything runs, leases, tokens, the publish checks, the CI side.

The watcher under test gets a stand-in `snakemake` that only leaves a marker: a refusal must
never reach it. Numbers in the test names refer to the points of issue 9.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import botocore.exceptions
import jwt
import pytest
import services as sv
import yaml

from geofm import names, versioning
from geofm.cli import submit as submit_cli
from geofm.cli import wait as wait_cli
from geofm.config import SAFE_NAME
from geofm.store import PreconditionFailed, Store, TooLarge
from geofm.watcher.checkout import Mirror, SubmissionError, path_problem
from geofm.watcher.lease import Keeper, Leases
from geofm.watcher.loop import Settings, Watcher
from geofm.watcher.publish import DvcRemote, Publisher, copy_verified
from geofm.watcher.runner import Runner, child_env
from geofm.watcher.status import Status
from geofm.watcher.token import Policy, TokenError, Verifier

BIOMASS_ONLY = {"crop": {"enabled": False}, "landslide": {"enabled": False}}


@pytest.fixture(scope="module")
def keys():
    return sv.KeySplit(sv.make_credentials())


@pytest.fixture(scope="module")
def s3(tmp_path_factory, keys):
    server = sv.SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), keys.admin, identities=keys.identities())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jwks():
    server = sv.Jwks()
    yield server
    server.close()


@pytest.fixture
def store(s3, keys, request):
    """The watcher's view of a prefix of its own (its key)."""
    return Store(s3.bucket, f"t/{request.node.name[:60]}", s3.endpoint, credentials=keys.watcher)


def ci_store(store: Store, keys) -> Store:
    return Store(store.bucket, store.prefix, store.endpoint_url, credentials=keys.ci)


def admin_store(store: Store, keys) -> Store:
    return Store(store.bucket, store.prefix, store.endpoint_url, credentials=keys.admin)


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3, shared_cache):
    """A bare 'GitLab' remote with this project, a researcher's clone and the registry snapshot."""
    root = tmp_path_factory.mktemp("project")
    cache = root / "cache"
    sv.seed_registry(cache, sv.registry_file(shared_cache))
    bare = sv.seed_remote(root, s3)
    return {"root": root, "bare": bare, "user": sv.clone(bare, root / "user"), "cache": cache}


def push_config(project, config: dict | bytes, branch: str, path: str = "config/config.yaml", extra=None) -> tuple:
    """Commit a config (and other files) on `branch` of the remote; (commit, config bytes)."""
    user = project["user"]
    sv.sh("git", "fetch", "-q", "origin", cwd=user)
    start = f"origin/{branch}" if sv.sh("git", "rev-parse", "-q", "--verify", f"origin/{branch}", cwd=user,
                                        check=False).returncode == 0 else "origin/main"  # fmt: skip
    sv.sh("git", "checkout", "-q", "-B", branch, start, cwd=user)
    text = config if isinstance(config, bytes) else yaml.safe_dump(config, sort_keys=False).encode()
    for rel, data in {path: text, **(extra or {})}.items():
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_bytes(data)
        sv.sh("git", "add", rel, cwd=user)
    sv.sh("git", "commit", "-qm", f"config on {branch}", cwd=user)
    sv.sh("git", "push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=user)
    return sv.sh("git", "rev-parse", "HEAD", cwd=user).stdout.strip(), text


def experiment(name: str, **overrides) -> dict:
    return {"experiment": name, **sv.EXPERIMENT_BASE, "tasks": BIOMASS_ONLY, **overrides}


@pytest.fixture
def keep_signals():
    """In-process CLIs install SIGTERM/SIGINT handlers: put pytest's back afterwards."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def make_watcher(tmp_path: Path, store: Store, jwks, project=None, **settings) -> Watcher:
    """An in-process watcher whose `snakemake` only leaves a marker (tmp_path / RAN)."""
    fake = tmp_path / "snakemake"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "RAN"}\nexit 1\n')
    fake.chmod(0o755)
    repo = project and sv.clone(project["bare"], tmp_path / "watcher-clone", "Watcher")
    policy = Policy(jwks.url, jwks.ISSUER, jwks.AUDIENCE, (jwks.PROJECT,), refresh_cooldown_s=0)
    from geofm.watcher.checkout import Operator

    operator = Operator(cache_root=project["cache"]) if project else Operator()
    s = Settings(repo=repo or tmp_path, home=tmp_path / "home", store=store, verifier=Verifier(policy),
                 runner=Runner(str(fake), cores="1"), dvc=DvcRemote("s3://none/dvc"), operator=operator, name="w",
                 poll_s=0.2, lease_ttl_s=30, max_backoff_s=1, fetch_within_s=5, push_within_s=5, **settings)  # fmt: skip
    return Watcher(s)


def handle(w: Watcher, store: Store, sid: str) -> dict:
    assert w._one(sid)
    return json.loads(store.get(store.status_key(sid))[0])


# 11. validators -----------------------------------------------------------------------------------
def test_11_every_validator_is_a_full_match():
    sid = "20261130T120000000000Z-0123456789ab-abcdef"
    good = [
        (names.SUBMISSION_ID, sid), (names.COMMIT, "a" * 40), (names.SAFE_BRANCH, "main"),
        (names.SAFE_BRANCH, "feature/x-1"), (names.SAFE_PREFIX, "geofm"), (names.SAFE_CONFIG_PATH, "config/c.yaml"),
        (names.SAFE_REMOTE, "origin"), (names.PROJECT_PATH, "group/sub/project"), (names.RELATIVE_PATH, "results/e"),
        (SAFE_NAME, "sample"),
    ]  # fmt: skip
    for pattern, value in good:
        assert names.valid(pattern, value), value
        for suffix in ("\n", " ", "\r\n", "\x00"):
            assert not names.valid(pattern, value + suffix), repr(value + suffix)
    for branch in ("main:refs/heads/x", "+main", "-x", "a..b", "a/.b", ".a", "x.lock", "a//b", "a b", "x^", "x~1",
                   "x/", "@{u}", "*"):  # fmt: skip
        assert not names.valid(names.SAFE_BRANCH, branch), branch
    with pytest.raises(ValueError):
        Store("b", "geofm\n", "http://127.0.0.1:1")
    store = Store("b", "geofm", "http://127.0.0.1:1")
    with pytest.raises(ValueError):
        store.status_key(sid + "\n")
    assert not names.relative_inside("/etc") and not names.relative_inside("results/../x")


# 10 (key split) and 8 (caps, probe) ---------------------------------------------------------------
def test_10_the_key_split_is_enforced_by_the_store(s3, keys):
    def allowed(creds, fn) -> bool:
        try:
            fn(s3.client(**creds))
            return True
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")
            return False

    b = s3.bucket
    bad = {**keys.ci, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    assert not allowed(bad, lambda c: c.list_objects_v2(Bucket=b))
    put = lambda key: lambda c: c.put_object(Bucket=b, Key=key, Body=b"{}")  # noqa: E731
    assert allowed(keys.ci, put("p/queue/x")) and allowed(keys.ci, put("p/submissions/x/config.yaml"))
    assert not allowed(keys.ci, put("p/status/x.json")), "CI could forge a status"
    assert not allowed(keys.ci, put("p/leases/x.json")) and not allowed(keys.ci, put("p/quarantine/x"))
    assert allowed(keys.watcher, put("p/status/x.json")) and allowed(keys.watcher, put("p/leases/x.json"))
    assert not allowed(keys.watcher, put("p/submissions/x/config.yaml")) and not allowed(keys.watcher, put("dvc/x"))
    assert allowed(keys.dvc, put("dvc/files/x")) and not allowed(keys.dvc, put("p/status/x.json"))
    assert allowed(keys.ci, lambda c: c.get_object(Bucket=b, Key="p/status/x.json"))


def test_8_reads_are_capped(store, keys):
    admin = admin_store(store, keys)
    key = admin.status_key("20261130T120000000000Z-0123456789ab-abcdef")
    admin.put(key, b"{" + b" " * 2_000_000 + b"}")
    with pytest.raises(TooLarge):
        store.get(key, 4096)
    with pytest.raises(Exception, match="bytes"):
        Status.parse(b"{" + b" " * 300_000 + b"}")


class IgnoringS3(http.server.BaseHTTPRequestHandler):
    """An S3 stand-in that stores objects but ignores If-None-Match / If-Match (as some stores do)."""

    objects: dict[str, bytes] = {}

    def _reply(self, code: int, body: bytes = b"", etag: str | None = None):
        self.send_response(code)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.objects[self.path.split("?")[0]] = data
        self._reply(200, etag=f'"{hashlib.md5(data).hexdigest()}"')

    def do_DELETE(self):
        self.objects.pop(self.path.split("?")[0], None)
        self._reply(204)

    def log_message(self, *args):
        pass


def test_8_a_store_that_ignores_conditional_writes_is_refused_at_start_up(store, jwks, tmp_path, capfd, keep_signals):
    assert store.probe_conditional_writes("w") is None  # SeaweedFS honours them
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IgnoringS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lax = Store("b", "geofm", f"http://127.0.0.1:{server.server_address[1]}", credentials=sv.make_credentials())
        assert "If-None-Match" in lax.probe_conditional_writes("w")
        assert make_watcher(tmp_path, lax, jwks).run() == 2
    finally:
        server.shutdown()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to start" in err[0] and "conditional writes" in err[0]


# 6 and 5: leases -------------------------------------------------------------------------------
def leases(store: Store, name: str, ttl: float = 30) -> Leases:
    return Leases(store, name, "host", ttl, log=lambda _: None)


def submit(store: Store, keys, jwks, commit: str = "0" * 40, branch: str = "main", **meta) -> str:
    config = meta.pop("config", b"experiment: x\n")
    doc = {"commit": commit, "branch": branch, "config_path": "config/config.yaml",
           "id_token": jwks.mint(commit, branch), **meta}  # fmt: skip
    return ci_store(store, keys).submit(config, doc)


def claim_at_once(watchers: list[Leases], sid: str) -> list:
    """Every watcher claims `sid` at the same moment (threads released by one barrier)."""
    won = [None] * len(watchers)
    barrier = threading.Barrier(len(watchers))

    def claim(i):
        barrier.wait()
        won[i] = watchers[i].claim(sid)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(watchers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won


def test_6_exactly_one_of_many_claims_wins_and_a_stale_lease_is_taken_by_exactly_one(store, keys, jwks):
    sid = submit(store, keys, jwks)
    many = [leases(store, f"w{i}", ttl=1.5) for i in range(8)]
    won = claim_at_once(many, sid)
    assert sum(x is not None for x in won) == 1
    holder = next(x for x in won if x)
    b, c = leases(store, "b"), leases(store, "c")
    assert b.claim(sid) is None and c.claim(sid) is None  # both start observing the ETag
    time.sleep(2.0)  # no renewal for longer than the lease's TTL
    taken = claim_at_once([b, c], sid)
    assert sum(x is not None for x in taken) == 1
    new = next(x for x in taken if x)
    old_owner = next(w for w, x in zip(many, won) if x)
    assert old_owner.renew(holder) is False  # the old holder learns it lost the lease ...
    old_owner.release(holder)  # ... and its release cannot delete the new holder's lease (If-Match)
    doc = json.loads(store.get(store.lease_key(sid))[0])
    assert doc["token"] == new.token


def test_6_a_holder_fences_itself_when_renewals_fail_for_half_its_ttl(s3, store, keys, jwks):
    sid = submit(store, keys, jwks)
    relay = sv.Relay(s3.ports["s3.port"])
    via = Store(store.bucket, store.prefix, relay.endpoint, credentials=keys.watcher)
    holder = leases(via, "a", ttl=3)
    lease = holder.claim(sid)
    fenced: list[str] = []
    keeper = Keeper(holder, lease, fenced.append, tick=lambda: None, interval=0.2)
    keeper.start()
    try:
        time.sleep(1.5)
        assert not keeper.fenced.is_set() and leases(store, "b", ttl=3).claim(sid) is None  # renewed: never stale
        relay.cut()
        sv.wait_for(keeper.fenced.is_set, 10, interval=0.05, what="the holder to fence itself")
        took = time.monotonic() - lease.renewed  # since its last successful renewal
        assert 1.5 <= took < 3.0, took  # after TTL/2 without renewal, before anyone may see it stale
        assert fenced and "over half its TTL" in fenced[0]
    finally:
        keeper.stop()
        relay.restore()


def test_6_a_lease_taken_behind_the_holders_back_fences_it(store, keys, jwks):
    sid = submit(store, keys, jwks)
    holder = leases(store, "a", ttl=1.2)
    lease = holder.claim(sid)
    keeper = Keeper(holder, lease, lambda _: None, tick=lambda: None, interval=0.2)
    keeper.start()
    try:
        for _ in range(20):
            body, etag = store.get(lease.key)
            try:
                store.put(lease.key, body.replace(lease.token.encode(), b"someone-else"), if_match=etag)
                break
            except PreconditionFailed:
                continue
        sv.wait_for(keeper.fenced.is_set, 10, what="the holder to notice")
        assert "another watcher" in keeper.reason
    finally:
        keeper.stop()


def test_6_a_restarted_watcher_takes_its_own_dead_lease_at_once(store, keys, jwks):
    sid = submit(store, keys, jwks)
    gone = subprocess.Popen(["true"])
    gone.wait()
    old = leases(store, "node1")
    old.pid = gone.pid  # the lease of a crashed process of the same watcher
    assert old.claim(sid) is not None
    assert leases(store, "other", ttl=600).claim(sid) is None
    assert leases(store, "node1", ttl=600).claim(sid) is not None


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json {", b'{"owner": "x"}', b"{" + b" " * 10_000 + b"}"])
def test_5_a_malformed_lease_is_quarantined_and_the_submission_claimed_next(store, keys, jwks, body):
    sid = submit(store, keys, jwks)
    store.put(store.lease_key(sid), body)
    w = leases(store, "w")
    assert w.claim(sid) is None
    reasons = [k for k in store.list(f"{store.prefix}/quarantine/{sid}/") if k.endswith(".reason.json")]
    assert len(reasons) == 1 and "lease" in json.loads(admin_store(store, keys).get(reasons[0])[0])["reason"]
    assert w.claim(sid) is not None


def test_5_a_malformed_status_is_quarantined_and_replaced(tmp_path, store, keys, jwks, project):
    sid = submit(store, keys, jwks)
    store.put(store.status_key(sid), b'{"submission": "x", "state": "running"}')
    w = make_watcher(tmp_path, store, jwks, project)
    status = handle(w, store, sid)  # runs on to a refusal (commit 000...: not on the remote)
    assert status["state"] == "failed" and [h["state"] for h in status["history"]][-1] == "failed"
    assert any(k.endswith(".reason.json") for k in store.list(f"{store.prefix}/quarantine/{sid}/"))


# token mutations -------------------------------------------------------------------------------------
def mutated_tokens(jwks, commit: str) -> dict[str, str]:
    """The eight mutations of issue 9, each of a token that is otherwise valid for `commit` on main."""
    if "kid-unserved" not in jwks.keys:
        jwks.add_key("kid-unserved", serve=False)
    now = int(time.time())
    return {
        "bad signature": jwks.mint(commit, key_of="kid-unserved"),  # signed with another key, claims kid-1
        "wrong key id": jwks.mint(commit, kid="kid-unserved"),
        "wrong issuer": jwks.mint(commit, iss="https://evil.example.com"),
        "wrong audience": jwks.mint(commit, aud="someone-else"),
        "expired": jwks.mint(commit, exp=now - 600, iat=now - 4000, nbf=now - 4000),
        "other project": jwks.mint(commit, project_path="evil/geofm-pipeline"),
        "other ref": jwks.mint(commit, ref="feature"),
        "sha mismatch": jwks.mint("d" * 40),
    }


def test_token_verification_refuses_every_mutation(jwks):
    commit = "c" * 40
    v = Verifier(Policy(jwks.url, jwks.ISSUER, jwks.AUDIENCE, (jwks.PROJECT,), require_protected=True,
                        refresh_cooldown_s=0))  # fmt: skip
    assert v.verify(jwks.mint(commit), commit=commit, branch="main")["sha"] == commit
    mutations = {
        **mutated_tokens(jwks, commit),
        "unprotected ref": jwks.mint(commit, ref_protected="false"),
        "tag pipeline": jwks.mint(commit, ref_type="tag"),
        "not a JWT": "not-a-token",
        "HS256 (algorithm confusion)": jwt.encode(jwks.claims(commit), "a-shared-secret-of-at-least-32-bytes",
                                                  algorithm="HS256", headers={"kid": "kid-1"}),
    }  # fmt: skip
    for name, token in mutations.items():
        with pytest.raises(TokenError):
            v.verify(token, commit=commit, branch="main")
            pytest.fail(f"accepted: {name}")
    # A token valid when it was uploaded stays valid while queued; judged at upload time.
    now = int(time.time())
    late = jwks.mint(commit, exp=now - 600, iat=now - 1200, nbf=now - 1200)
    assert v.verify(late, commit=commit, branch="main", at=now - 900)
    # A rotated key is fetched on its first use (unknown kid: the JWKS is read again).
    before = jwks.fetches
    jwks.add_key("kid-2")
    assert v.verify(jwks.mint(commit, kid="kid-2"), commit=commit, branch="main")
    assert jwks.fetches == before + 1


def test_token_mutations_are_refused_and_nothing_runs(tmp_path, store, keys, jwks, project):
    commit, text = push_config(project, experiment("tokens"), "main")
    w = make_watcher(tmp_path, store, jwks, project)
    bad = mutated_tokens(jwks, commit)
    for name, token in bad.items():
        sid = ci_store(store, keys).submit(text, {"commit": commit, "branch": "main",
                                                  "config_path": "config/config.yaml", "id_token": token})  # fmt: skip
        status = handle(w, store, sid)
        assert status["state"] == "failed" and "ID token" in status["message"], (name, status)
        assert not store.exists(store.queue_key(sid)), name
        assert not (w.s.home / "runs" / sid).exists(), f"{name}: something was checked out"
    assert not (tmp_path / "RAN").exists(), "a refused submission reached snakemake"


# 1, 3, 4, 12: refusals before anything runs ---------------------------------------------------------
def test_1_a_commit_that_is_not_on_the_branch_is_refused(tmp_path, store, keys, jwks, project):
    feature, text = push_config(project, experiment("feature"), "feature-x")
    w = make_watcher(tmp_path, store, jwks, project)
    # A token for main at that sha cannot come from GitLab, but the watcher holds the line anyway.
    sid = submit(store, keys, jwks, commit=feature, branch="main", config=text)
    status = handle(w, store, sid)
    assert status["state"] == "failed" and "not an ancestor of origin/main" in status["message"], status
    assert not (tmp_path / "RAN").exists()


def test_3_yte_and_anchors_are_refused_in_the_submitted_and_the_loaded_config(tmp_path, store, keys, jwks, project):
    marker = tmp_path / "PWNED"
    yte = f'__use_yte__: true\nexperiment: yte\nresults_dir: ?"/tmp/" + "x"\ndescription: ?__import__("pathlib").Path("{marker}").touch()\n'
    w = make_watcher(tmp_path, store, jwks, project)
    cases = {
        "submitted YTE": (yte.encode(), "config/config.yaml", None, "__use_yte__"),
        "YTE in config/config.yaml": (yaml.safe_dump(experiment("clean")).encode(), "config/clean.yaml",
                                      {"config/config.yaml": yte.encode()}, "config/config.yaml: __use_yte__"),
        "alias bomb": (b"experiment: bomb\nx: &a [1, 2]\ntasks:\n  biomass:\n    overrides:\n      set: {a: *a}\n",
                       "config/config.yaml", None, "anchors and aliases"),
    }  # fmt: skip
    for i, (name, (text, path, extra, expected)) in enumerate(cases.items()):
        commit, _ = push_config(project, text, f"yte-{i}", path=path, extra=extra)
        sid = submit(store, keys, jwks, commit=commit, branch=f"yte-{i}", config=text, config_path=path)
        status = handle(w, store, sid)
        assert status["state"] == "failed" and expected in status["message"], (name, status["message"])
    assert not marker.exists() and not (tmp_path / "RAN").exists()


def test_4_outputs_overlapping_the_code_are_refused(tmp_path, store, keys, jwks, project):
    w = make_watcher(tmp_path, store, jwks, project)
    cases = [
        ({"results_dir": ".", "experiment": "geofm"}, "overlaps"),
        ({"results_dir": ".", "experiment": "ci"}, "overlaps"),
        ({"results_dir": "config"}, "overlaps"),
        ({"scratch_dir": "/tmp/elsewhere"}, "leaves the run's folder"),
        ({"cache_dir": "../up"}, "leaves the run's folder"),
    ]
    for i, (change, expected) in enumerate(cases):
        commit, text = push_config(project, {**experiment("paths"), **change}, f"paths-{i}")
        status = handle(w, store, submit(store, keys, jwks, commit=commit, branch=f"paths-{i}", config=text))
        assert status["state"] == "failed" and expected in status["message"], (change, status["message"])
    assert not (tmp_path / "RAN").exists()


def test_12_hostile_configs_fail_the_validate_stage_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(sv.REPO)
    cases = {
        "results_dir": ({**experiment("geofm"), "results_dir": "."}, "results_dir"),
        "cells": ({**experiment("big"), "seeds": list(range(2000)), "models": {
            f"m{i}": {"backbone": "prithvi_eo_tiny"} for i in range(10)}}, "cells, more than"),
        "huge": ({**experiment("huge"), "seeds": list(range(100_000))}, "bytes, more than"),
        "resamples": ({**experiment("boot"), "bootstrap": {"resamples": 10_000_000_000}}, "bootstrap.resamples"),
        "dpi": ({**experiment("dpi"), "predictions": {"dpi": 5000}}, "predictions.dpi"),
        "inf": (b"experiment: x\ntasks: {biomass: {overrides: {lr: .inf}}}\n", "not plain data"),
        "nan": (b"experiment: x\ntasks: {biomass: {overrides: {lr: .nan}}}\n", "not plain data"),
        "alias bomb": (b"experiment: x\na: &a [1,1,1,1]\nb: &b [*a,*a,*a,*a]\nc: [*b,*b,*b,*b]\n", "anchors"),
    }  # fmt: skip
    for name, (config, expected) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_bytes(config if isinstance(config, bytes) else yaml.safe_dump(config).encode())
        start = time.monotonic()
        assert submit_cli.main(["check", str(path)]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("config error:") and expected in err[0], (name, err)
        assert time.monotonic() - start < 20, name


# 2: the child's environment; 9: caches ---------------------------------------------------------------
def test_2_the_child_gets_no_credential(tmp_path):
    environ = {
        "PATH": "/usr/bin", "LANG": "C.UTF-8", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_SESSION_TOKEN": "c", "GEOFM_GIT_TOKEN": "d", "GEOFM_DVC_SECRET_ACCESS_KEY": "e", "CI_JOB_TOKEN": "f",
        "GITLAB_TOKEN": "g", "HF_TOKEN": "h", "SSH_AUTH_SOCK": "i", "MY_API_KEY": "j", "DB_PASSWORD": "k",
        "GEOFM_SLURM_PARTITION": "gpu", "SLURM_CONF": "/etc/slurm/slurm.conf", "PYTHONPATH": "/watcher",
        "SNAKEMAKE_PROFILE": "/evil", "GIT_CONFIG_COUNT": "1", "OTHER": "x",
    }  # fmt: skip
    env = child_env(environ, ("OTHER", "MY_API_KEY", "AWS_*"), tmp_path, tmp_path / "checkout")
    assert set("abcdefghijk") & set(env.values()) == set(), env
    assert env["GEOFM_SLURM_PARTITION"] == "gpu" and env["OTHER"] == "x" and env["SLURM_CONF"]
    assert env["PYTHONPATH"] == str(tmp_path / "checkout") and env["HOME"] == str(tmp_path)
    assert "SNAKEMAKE_PROFILE" not in env and "GIT_CONFIG_COUNT" not in env


@pytest.mark.skipif(os.geteuid() != 0, reason="running the child as another user needs root (or sudo)")
def test_2_run_as_another_user_the_run_cannot_write_the_watchers_clone_or_venv(tmp_path, store, jwks):
    base = Path(tempfile.mkdtemp(prefix="geofm-run-as-", dir="/tmp"))  # pytest's tmp is private to root
    try:
        base.chmod(0o755)
        clone, run_dir = base / "watcher-clone", base / "runs" / "sid"
        (clone / "geofm").mkdir(parents=True)
        (run_dir / "checkout").mkdir(parents=True)
        probe = base / "snakemake"
        probe.write_text(
            "#!/bin/sh\nid -u > uid\ntouch ok\n"
            f"touch {clone}/geofm/pwned 2> clone.err\ntouch {sv.VENV_BIN.parent}/pwned 2> venv.err\nexit 0\n"
        )
        probe.chmod(0o755)
        w = make_watcher(tmp_path, store, jwks, run_as="nobody")
        w.own_run_dir(run_dir)
        runner = Runner(str(probe), run_as="nobody")
        result = runner.run(run_dir / "checkout", run_dir / "config.json", run_dir, [], should_stop=lambda: None,
                            deadline=time.monotonic() + 60)  # fmt: skip
        assert result.rc == 0
        checkout = run_dir / "checkout"
        assert (checkout / "uid").read_text().strip() == str(pwd.getpwnam("nobody").pw_uid)
        assert (checkout / "ok").exists() and "Permission denied" in (checkout / "clone.err").read_text()
        assert not (clone / "geofm" / "pwned").exists() and not (sv.VENV_BIN.parent / "pwned").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_9_absolute_scratch_and_caches_only_from_the_operator():
    for key in ("scratch_dir", "cache_dir", "results_dir"):
        assert path_problem({key: "/scratch/mine"}), key  # the operator's --scratch-root / --cache-root
        assert path_problem({key: "relative/folder"}) is None, key
    assert path_problem({"sample_data": {"root": "/shared/samples"}})


# publish checks (1, 4), DVC without the checkout's config (2) ------------------------------------------
def _results(folder: Path, stale: bool = False) -> None:
    (folder / "out").mkdir(parents=True)
    rows = [{"task": "biomass", "model": "tiny", "seed": 0, "status": "failed" if stale else "ok"}]
    (folder / "out" / "summary.json").write_text(json.dumps({"rows": rows}))
    (folder / "out" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n\0binary")
    (folder / "err").mkdir()
    (folder / ("err/old.err" if stale else "err/biomass.err")).write_text("cause: x\n")
    (folder / "predictions").mkdir()
    (folder / "predictions" / "chip.png").write_bytes(os.urandom(2048))


@pytest.fixture
def publisher(tmp_path, project, s3, keys):
    mirror_dir = sv.clone(project["bare"], tmp_path / "mirror", "Watcher")
    mirror = Mirror(mirror_dir, "origin", print, threading.Event(), max_backoff=1, fetch_within=5)
    dvc = DvcRemote(f"s3://{s3.bucket}/dvc", s3.endpoint, keys.dvc)
    return Publisher(mirror, dvc, log=print, stop=threading.Event(), max_backoff=1, push_within=10)


def prepare(work: Path, exp: str, sid: str, outcome: str = "succeeded", **settings) -> dict:
    return versioning.prepare(work, Path(f"results/{exp}"), experiment=exp, outcome=outcome,
                              settings={"branch": "main", "submission": sid, **settings},
                              receipt=work / "receipt.json", log=lambda _: None)  # fmt: skip


def test_publish_lays_the_results_onto_a_moved_branch_and_pushes_dvc_with_its_own_key(tmp_path, project, publisher,
                                                                                       keys):  # fmt: skip
    bare, sid = project["bare"], "20261130T120000000000Z-0123456789ab-000001"
    work = sv.clone(bare, tmp_path / "work")
    base = sv.sh("git", "rev-parse", "HEAD", cwd=work).stdout.strip()
    # The checkout's own DVC config names a remote the watcher's key must never reach.
    sv.sh(sv.VENV_BIN / "dvc", "remote", "add", "-f", "-d", "storage", "s3://attacker/dvc", cwd=work)
    other = sv.clone(bare, tmp_path / "other", "Colleague")
    (other / "NOTES.txt").write_text("a colleague's change\n")
    sv.sh("git", "add", "NOTES.txt", cwd=other)
    sv.sh("git", "commit", "-qm", "colleague", cwd=other)
    sv.sh("git", "push", "-q", "origin", "HEAD:main", cwd=other)
    moved = sv.sh("git", "rev-parse", "HEAD", cwd=other).stdout.strip()

    _results(work / "results" / "exp")
    receipt = prepare(work, "exp", sid)
    assert receipt["base"] == base  # prepared on the tip the checkout had; nothing pushed by the rule
    assert sv.sh("git", "rev-parse", "main", cwd=bare).stdout.strip() == moved
    commit = publisher.fetch(work, sid)
    assert commit == receipt["results_commit"]
    publisher.check(commit, base, "results/exp", "exp", sid)
    assert publisher.push_dvc(commit, "results/exp", work, tmp_path / "staging") >= 3
    pushed = publisher.push_git(commit, base, "main", "results/exp", sid)
    head = sv.sh("git", "rev-parse", "main", cwd=bare).stdout.strip()
    assert pushed == head != commit and sv.sh("git", "rev-parse", f"{head}^", cwd=bare).stdout.strip() == moved
    tree = sv.sh("git", "ls-tree", "-r", "--name-only", head, cwd=bare).stdout.split()
    assert "NOTES.txt" in tree and "results/exp/predictions.dvc" in tree and "results/exp/out/curves.png" not in tree
    # Published once: a second publish finds it by its Submission trailer.
    assert publisher.push_git(commit, base, "main", "results/exp", sid) == head
    # A fresh clone restores the same bytes from the operator's DVC remote.
    fresh = sv.clone(bare, tmp_path / "fresh")
    sv.sh(sv.VENV_BIN / "dvc", "pull", "-q", cwd=fresh, env=keys.ci)
    for f in (work / "results/exp").rglob("*"):
        if f.is_file() and ".gitignore" not in f.name:
            assert (fresh / f.relative_to(work)).read_bytes() == f.read_bytes(), f


def test_4_publish_refuses_a_results_commit_that_touches_anything_else(tmp_path, project, publisher):
    bare, sid = project["bare"], "20261130T120000000000Z-0123456789ab-000002"
    work = sv.clone(bare, tmp_path / "work")
    base = sv.sh("git", "rev-parse", "HEAD", cwd=work).stdout.strip()
    _results(work / "results" / "touch")
    prepare(work, "touch", sid)
    good = publisher.fetch(work, sid)
    publisher.check(good, base, "results/touch", "touch", sid)

    def hostile(change, message=None) -> str:
        sv.sh("git", "checkout", "-q", "-f", "--detach", good, cwd=work)
        paths = change() or []
        if paths:
            sv.sh("git", "add", "-A", "-f", "--", *paths, cwd=work)
        msg = message or sv.sh("git", "log", "-1", "--format=%B", good, cwd=work).stdout
        sv.sh("git", "commit", "-q", "--amend", "-m", msg, cwd=work)
        sv.sh("git", "update-ref", versioning.RESULTS_REF, "HEAD", cwd=work)
        return publisher.fetch(work, sid)

    def write(rel: str, text: str | None = None, link: str | None = None) -> list[str]:
        path = work / rel
        if link:
            path.symlink_to(link)
        elif text is None:
            path.unlink()
        else:
            path.write_text(text)
        return [rel]

    cases = [
        (lambda: write("geofm/store.py", "pwned\n"), None, "outside results/touch/"),
        (lambda: write("ci/.gitlab-ci.yml"), None, "outside results/touch/"),
        (lambda: write("results/touch/out/link", link="/etc/passwd"), None, "not a plain"),
        (lambda: write("results/touch/.gitattributes", "* filter=x\n"), None, "not a plain"),
        (lambda: None, "results without trailers\n", "trailers"),
    ]
    for change, message, expected in cases:
        commit = hostile(change, message)
        with pytest.raises(SubmissionError, match=expected):
            publisher.check(commit, base, "results/touch", "touch", sid)
    with pytest.raises(SubmissionError, match="not built on the branch tip"):
        publisher.check(good, good, "results/touch", "touch", sid)


def test_2_dvc_objects_are_copied_without_links_and_checked(tmp_path):
    secret = tmp_path / "watcher.env"
    secret.write_text("GEOFM_GIT_TOKEN=very-secret\n")
    md5 = hashlib.md5(secret.read_bytes()).hexdigest()
    link = tmp_path / "cache" / md5[:2] / md5[2:]
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    with pytest.raises(SubmissionError, match="not a plain file"):
        copy_verified(link, tmp_path / "out" / md5, md5)
    wrong = tmp_path / "cache" / "ab" / ("c" * 30)
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(b"anything")
    with pytest.raises(SubmissionError, match="does not match"):
        copy_verified(wrong, tmp_path / "out" / "x", "ab" + "c" * 30)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# 10: the CI side ------------------------------------------------------------------------------------
def test_10_status_fields_are_validated():
    sid = "20261130T120000000000Z-0123456789ab-abcdef"
    ok = {"submission": sid, "state": "succeeded", "commit": "a" * 40, "branch": "main", "experiment": "e",
          "results_path": "results/e", "results_commit": "b" * 40}  # fmt: skip
    assert Status.parse(json.dumps(ok).encode(), sid).results_path == "results/e"
    for change in ({"branch": "main:refs/heads/x"}, {"branch": "main\n"}, {"results_path": "/etc"},
                   {"results_path": "../../x"}, {"submission": sid[:-1] + "0"}, {"commit": "HEAD"},
                   {"state": "done"}, {"attempt": "1"}, {"summary": {"rows": []}}, {"experiment": "../x"}):  # fmt: skip
        with pytest.raises(ValueError):
            Status.parse(json.dumps({**ok, **change}).encode(), sid)
    with pytest.raises(ValueError):
        Status.parse(b"[]", sid)
    status = Status.parse(json.dumps(ok).encode(), sid)
    assert wait_cli.problem(status, "a" * 40, "main") is None
    assert "commit" in wait_cli.problem(status, "c" * 40, "main")
    assert "branch" in wait_cli.problem(status, "a" * 40, "other")


def test_10_a_forged_success_does_not_pass_the_wait_job(tmp_path, project, publisher, store, keys, jwks,
                                                        monkeypatch, capsys, keep_signals):  # fmt: skip
    """Written with a key that can write status (the CI key cannot): the wait job still judges
    the fetched results, and the results commit must be on its branch above its commit."""
    bare = project["bare"]
    work = sv.clone(bare, tmp_path / "work")
    commit = sv.sh("git", "rev-parse", "HEAD", cwd=work).stdout.strip()
    sid = submit(store, keys, jwks, commit=commit)
    _results(work / "results" / "forged", stale=True)  # a failed cell
    prepare(work, "forged", sid, outcome="failed")
    results = publisher.push_git(publisher.fetch(work, sid), commit, "main", "results/forged", sid)
    publisher.push_dvc(results, "results/forged", work, tmp_path / "staging")
    ci = sv.clone(bare, tmp_path / "ci")
    forged = {"submission": sid, "state": "succeeded", "commit": commit, "branch": "main", "experiment": "forged",
              "results_path": "results/forged", "results_commit": results, "message": "all fine"}  # fmt: skip
    for key, value in {**keys.ci, "S3_BUCKET": store.bucket, "S3_PREFIX": store.prefix,
                       "S3_ENDPOINT_URL": store.endpoint_url}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ci)
    args = [sid, "--poll", "0.2", "--timeout", "30", "--commit", commit, "--branch", "main", "--fetch", "out"]
    for change, expected in (
        ({}, "cells are not ok in the fetched summary.json"),
        ({"results_path": "/etc/forged"}, "refusing the status"),
        ({"branch": "main:refs/heads/pwned"}, "refusing the status"),
        ({"commit": "f" * 40}, "refusing the status"),
        ({"results_commit": "f" * 40}, "could not be fetched"),
    ):
        store.put(store.status_key(sid), json.dumps({**forged, **change}).encode())
        code = wait_cli.main(args)
        out = capsys.readouterr().out
        assert code != 0 and expected in out, (change, out[-2000:])
    assert sv.sh("git", "branch", "-a", "--list", "*pwned*", cwd=ci).stdout.strip() == ""


def test_idle_watcher_is_cheap_and_stops_on_sigterm(s3, keys, jwks, tmp_path):
    repo = tmp_path / "repo"
    sv.sh("git", "init", "-q", repo, cwd=tmp_path)
    w = sv.WatcherProcess("idle", repo, tmp_path / "home", keys.watcher_env(), s3, poll=1, prefix="idle",
                          **jwks.watcher_args()).start()  # fmt: skip
    try:
        sv.wait_for(lambda: "watching" in w.text(), 60, what="the watcher to start")

        def cpu_s():
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before, start = cpu_s(), time.monotonic()
        time.sleep(6)
        share = (cpu_s() - before) / (time.monotonic() - start)
        print(f"\nidle watcher, polling every 1 s: {100 * share:.2f}% of one core")
        assert share < 0.05
    finally:
        assert w.stop(timeout=30) == 0
    assert "stopped" in w.text()
