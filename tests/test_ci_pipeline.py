"""Commit-triggered experiments end to end, every component real and started here:
gitlab-ci-local runs ci/.gitlab-ci.yml unchanged (shell mode) against a bare git remote, the
SeaweedFS S3 server checks credentials with the operator's key split (CI's key, the watchers'
key, the DVC key), a JWKS on loopback stands in for GitLab's ID token keys (gitlab-ci-local
cannot mint ID tokens: the test mints each pipeline's token and passes it as the job's
variable), two watcher processes share the bucket and run the real workflow on the sample
data (tiny backbone, 1 epoch), DVC stores the results.

One module-wide stack serves every test; the scenarios run in this order:
invalid config -> two experiments pushed to main at once (one succeeds, one fails) -> the
secrets grep over everything produced. Faults (outages, crashes, takeovers, deadlines,
cancellation) are tests/test_watcher_faults.py, with a stand-in workflow that takes seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import services as sv
import yaml

from geofm.store import DEFAULT_PREFIX, Store

pytestmark = pytest.mark.e2e

BIOMASS_ONLY = {"crop": {"enabled": False}, "landslide": {"enabled": False}}
QUICK = {"max_epochs": 1, "batch_size": 4}
# A faulty test-set augmentation: valid to construct, harmless in training and validation,
# and fatal only when the test split goes through it (8x8 chips cannot be padded to patches).
FAULTY_TEST_TRANSFORM = [
    {"class_path": "albumentations.Resize", "init_args": {"height": 8, "width": 8}},
    {"class_path": "albumentations.pytorch.transforms.ToTensorV2"},
]


def experiment(name: str, **overrides) -> dict:
    return {"experiment": name, **sv.EXPERIMENT_BASE, "tasks": {**BIOMASS_ONLY, "biomass": {"overrides": QUICK}},
            **overrides}  # fmt: skip


def parse_time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


class Stack:
    def __init__(self, root: Path, snapshot: Path):
        self.root, self.snapshot = root, snapshot
        self.credentials = sv.make_credentials()  # the tests' own (admin) key
        self.keys = sv.KeySplit(self.credentials)
        self.s3 = sv.SeaweedFS(root / "seaweedfs", self.credentials, identities=self.keys.identities())
        self.jwks = sv.Jwks()
        self.watchers: dict[str, sv.WatcherProcess] = {}
        self.outputs: list[Path] = []

    def start(self) -> None:
        self.s3.start()
        self.bare = sv.seed_remote(self.root, self.s3)
        self.store = Store(self.s3.bucket, DEFAULT_PREFIX, self.s3.endpoint, credentials=self.credentials)
        for name in ("A", "B"):
            repo = sv.clone(self.bare, self.root / f"watcher-{name}-repo", f"Watcher {name}")
            home, cache = self.root / f"watcher-{name}", self.root / f"cache-{name}"
            sv.seed_registry(cache, self.snapshot)
            options = {**self.jwks.watcher_args(), "cache-root": cache}
            self.watchers[name] = sv.WatcherProcess(name, repo, home, self.keys.watcher_env(), self.s3, **options)
            self.watchers[name].start()

    def close(self) -> None:
        for w in self.watchers.values():
            if w.alive():
                w.stop()
        self.s3.stop()
        self.jwks.close()

    def user_clone(self, name: str) -> Path:
        checkout = sv.clone(self.bare, self.root / name, name.capitalize())
        sv.seed_registry(checkout / "resources" / "cache", self.snapshot)
        return checkout

    def commit_config(self, checkout: Path, config: dict, message: str, branch: str = "main") -> str:
        (checkout / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        sv.sh("git", "commit", "-q", "-am", message, cwd=checkout)
        # Pushed by URL: origin/<branch> stays at the commit before the push, which is what
        # GitLab compares `rules: changes` against (gitlab-ci-local diffs against origin/main).
        sv.sh("git", "push", "-q", str(self.bare), f"HEAD:refs/heads/{branch}", cwd=checkout)
        return sv.sh("git", "rev-parse", "HEAD", cwd=checkout).stdout.strip()

    def pipeline(self, checkout: Path) -> subprocess.Popen:
        commit = sv.sh("git", "rev-parse", "HEAD", cwd=checkout).stdout.strip()
        branch = sv.sh("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=checkout).stdout.strip()
        variables = {"S3_ENDPOINT_URL": self.s3.endpoint, "S3_BUCKET": self.s3.bucket, "GEOFM_VENV": sv.VENV_BIN.parent,
                     "GEOFM_WAIT_TIMEOUT": 480, "GEOFM_POLL_SECONDS": 2,
                     "GEOFM_ID_TOKEN": self.jwks.mint(commit, branch)}  # fmt: skip
        cmd = ["timeout", "-k", "15", "600", str(sv.GITLAB_CI_LOCAL), "--file", "ci/.gitlab-ci.yml",
               "--shell-executor-no-image", "--no-color"]  # fmt: skip
        for key, value in variables.items():
            cmd += ["--variable", f"{key}={value}"]
        out = open(self.root / f"ci-{checkout.name}.log", "w")
        self.outputs.append(Path(out.name))
        # CI's key only, as GitLab's masked variables: it can write the queue, never a status.
        env = {**sv.BASE_ENV, **self.keys.ci, "FORCE_COLOR": "0", "NO_COLOR": "1"}
        return subprocess.Popen(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)

    def status(self, sid: str) -> dict | None:
        try:
            return json.loads(self.store.get(self.store.status_key(sid))[0])
        except KeyError:
            return None

    def runs_of(self, sid: str) -> dict[str, int]:
        return {name: w.text().count(f"running {sid} (attempt") for name, w in self.watchers.items()}

    def worktree(self, sid: str) -> Path:
        found = [w.home / "runs" / sid / "checkout" for w in self.watchers.values()]
        found = [p for p in found if p.is_dir()]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_cache):
    assert sv.GITLAB_CI_LOCAL.exists(), "run tests/setup-system.sh (installs gitlab-ci-local into .tools/)"
    with sv.running(Stack(tmp_path_factory.mktemp("cos"), sv.registry_file(shared_cache))) as s:
        yield s


def submission_id(output: str) -> str:
    m = re.search(r"submitted \S+ at \w+ \(\S+\) as (\S+)", output)
    assert m, output[-3000:]
    return m.group(1)


# 1. invalid config ------------------------------------------------------------------------------
def test_invalid_config_is_rejected_in_validate_and_nothing_is_uploaded(stack):
    checkout = stack.user_clone("invalid")
    before = stack.s3.keys(DEFAULT_PREFIX)
    bad = experiment("invalid", models={"v3": {"backbone": "prithvi_eo_v3_300"}})
    stack.commit_config(checkout, bad, "Experiment: a backbone that does not exist", branch="invalid")
    proc = stack.pipeline(checkout)
    assert proc.wait(300) != 0
    out = stack.outputs[-1].read_text()
    assert "config error: models.v3.backbone: 'prithvi_eo_v3_300' is not in TerraTorch's backbone registry" in out
    assert "submit" not in re.findall(r"^\s*(\w+)\s+starting", out, re.M)
    assert stack.s3.keys(DEFAULT_PREFIX) == before


# 2. two experiments pushed to main back to back --------------------------------------------------
@pytest.fixture(scope="module")
def experiments(stack):
    happy = stack.user_clone("happy")
    # Config values are data: a description full of shell syntax must reach no shell.
    description = "Happy $(touch PWNED) `touch PWNED2`; touch PWNED3"
    happy_commit = stack.commit_config(happy, experiment("happy", description=description), "Experiment happy")
    broken = stack.user_clone("broken")  # cloned after that push: its commit follows on main
    faulty = {"overrides": {**QUICK, "set": {"data.init_args.test_transform": FAULTY_TEST_TRANSFORM}}}
    broken_commit = stack.commit_config(
        broken, experiment("broken", tasks={**BIOMASS_ONLY, "biomass": faulty}), "Experiment broken test augmentation"
    )
    procs = {"happy": stack.pipeline(happy), "broken": stack.pipeline(broken)}
    codes = {name: p.wait(700) for name, p in procs.items()}
    logs = {name: (stack.root / f"ci-{name}.log").read_text() for name in procs}
    sids = {name: submission_id(logs[name]) for name in procs}
    return {
        "codes": codes, "logs": logs, "sids": sids, "checkouts": {"happy": happy, "broken": broken},
        "commits": {"happy": happy_commit, "broken": broken_commit},
        "status": {name: stack.status(sid) for name, sid in sids.items()},
    }  # fmt: skip


def test_happy_pipeline_passes_and_prints_the_metrics(experiments):
    out = experiments["logs"]["happy"]
    assert experiments["codes"]["happy"] == 0, out[-5000:]
    for job in ("validate", "submit", "wait"):
        assert re.search(rf"PASS\s+{job}", out), job
    assert re.search(r"running: \d+ of \d+ steps", out)  # visible progress while waiting
    assert re.search(r"metrics biomass/tiny/seed0: RMSE=[0-9.]+, MAE=[0-9.]+, R2=", out)
    assert re.search(r"biomass\s+tiny\s+0\s+ok\s+RMSE", out)  # the summary table
    assert "experiment succeeded; exit status 0" in out


def test_status_object_tells_the_whole_story(experiments):
    status = experiments["status"]["happy"]
    assert status["state"] == "succeeded" and status["experiment"] == "happy"
    assert status["commit"] == experiments["commits"]["happy"] and status["branch"] == "main"
    submitted, started = parse_time(status["submitted_at"]), parse_time(status["snakemake_started_at"])
    assert submitted <= parse_time(status["started_at"]) <= started <= parse_time(status["finished_at"])
    print(f"\nupload -> watcher starts snakemake: {(started - submitted).total_seconds():.1f} s (poll every 1 s)")
    assert [h["state"] for h in status["history"]] == ["running", "succeeded"]
    assert status["submitted_by"] == "researcher"  # from the verified ID token
    assert status["summary"][0]["status"] == "ok" and status["summary"][0]["headline_metric"] == "RMSE"
    assert re.fullmatch(r"[0-9a-f]{40}", status["results_commit"])
    failed = experiments["status"]["broken"]
    assert failed["state"] == "failed" and failed["summary"][0]["status"] == "failed"
    assert "cause: RuntimeError" in failed["errors"][0]["excerpt"]


def test_results_restore_byte_identical_from_a_fresh_clone(stack, experiments):
    sid = experiments["sids"]["happy"]
    produced = stack.worktree(sid) / "results" / "happy"
    files = {p.relative_to(produced): p.read_bytes() for p in produced.rglob("*") if p.is_file()}
    assert any(str(f).startswith("predictions/") for f in files) and Path("out/summary.csv") in files
    fresh = stack.root / "fresh"
    sv.sh("git", "clone", "-q", str(stack.bare), fresh, cwd=stack.root)
    sv.sh("git", "pull", "-q", cwd=fresh)
    sv.sh(sv.VENV_BIN / "dvc", "pull", "-q", cwd=fresh, env=stack.keys.ci, timeout=300)
    restored = fresh / "results" / "happy"
    assert {p.relative_to(restored) for p in restored.rglob("*") if p.is_file()} == set(files)
    for name, data in files.items():
        assert (restored / name).read_bytes() == data, name
    # The same from a checkout of the results commit (git checkout <commit> && dvc pull) ...
    commit = experiments["status"]["happy"]["results_commit"]
    sv.sh("git", "checkout", "-q", commit, cwd=fresh)
    sv.sh(sv.VENV_BIN / "dvc", "pull", "-q", cwd=fresh, env=stack.keys.ci, timeout=300)
    for name, data in files.items():
        assert (restored / name).read_bytes() == data, name
    # ... and in what the CI wait job fetched.
    fetched = experiments["checkouts"]["happy"] / "geofm-results" / "results" / "happy"
    for name, data in files.items():
        assert (fetched / name).read_bytes() == data, name


def test_failing_experiment_fails_the_pipeline_and_versions_its_evidence(stack, experiments):
    out = experiments["logs"]["broken"]
    assert experiments["codes"]["broken"] != 0
    assert re.search(r"FAIL\s+wait", out)
    assert "--- results/broken/err/biomass_tiny_seed0.err ---" in out
    assert "stage: evaluate" in out and "RuntimeError: Argument #4: Padding size" in out
    commit = experiments["status"]["broken"]["results_commit"]
    err = sv.sh("git", "show", f"{commit}:results/broken/err/biomass_tiny_seed0.err", cwd=stack.bare).stdout
    assert "cause: RuntimeError" in err and "stage: evaluate" in err
    summary = sv.sh("git", "show", f"{commit}:results/broken/out/summary.csv", cwd=stack.bare).stdout
    assert ",failed," in summary
    message = sv.sh("git", "log", "-1", "--format=%B", commit, cwd=stack.bare).stdout
    assert "Outcome: failed" in message and f"Config-Commit: {experiments['commits']['broken']}" in message
    # The fine-tune finished before the failure: its outputs are versioned too.
    tree = sv.sh("git", "ls-tree", "-r", "--name-only", commit, cwd=stack.bare).stdout.split()
    assert "results/broken/out/biomass/tiny/seed0/finetune.json" in tree and "results/broken/logs.dvc" in tree


def test_each_submission_ran_on_exactly_one_of_two_watchers(stack, experiments):
    for sid in experiments["sids"].values():
        runs = stack.runs_of(sid)
        assert sum(runs.values()) == 1, runs
    ran = {name: sum(stack.runs_of(sid)[name] for sid in experiments["sids"].values()) for name in stack.watchers}
    print(f"\nruns per watcher: {ran}")


def test_results_push_is_retried_when_the_branch_moved(stack, experiments):
    # "happy" was committed before "broken" on main, so main had moved on when its results
    # were pushed: the push was rejected, the branch fetched and the results laid onto it.
    sid = experiments["sids"]["happy"]
    logs = "".join(w.text() for w in stack.watchers.values())
    assert re.search(r"origin/main moved to [0-9a-f]{10}; laying the results onto it", logs)
    assert f"{sid}: pushed" in logs
    history = sv.sh("git", "log", "--format=%H %s", "main", cwd=stack.bare).stdout.splitlines()
    subjects = [line.split(" ", 1)[1] for line in history]
    assert sum(s.startswith("results: happy succeeded") for s in subjects) == 1
    assert sum(s.startswith("results: broken failed") for s in subjects) == 1
    for name in ("happy", "broken"):  # each results commit sits above its config commit
        results = experiments["status"][name]["results_commit"]
        ancestor = ["git", "merge-base", "--is-ancestor", experiments["commits"][name], results]
        assert sv.sh(*ancestor, cwd=stack.bare, check=False).returncode == 0


def test_results_commit_starts_no_new_pipeline(stack, experiments):
    checkout = experiments["checkouts"]["happy"]
    commit = experiments["status"]["happy"]["results_commit"]
    sv.sh("git", "fetch", "-q", "origin", cwd=checkout)
    sv.sh("git", "checkout", "-q", commit, cwd=checkout)
    # As GitLab would see the push of the results commit: compared with the commit before it.
    sv.sh("git", "update-ref", "refs/remotes/origin/main", f"{commit}^", cwd=checkout)
    message = sv.sh("git", "log", "-1", "--format=%B", commit, cwd=checkout).stdout
    assert "[skip ci]" in message
    for extra in ([], ["--variable", f"CI_COMMIT_MESSAGE={message}", "--ignore-predefined-vars", "CI_COMMIT_MESSAGE"]):
        assert planned_jobs(checkout, *extra) == {"validate": "never", "submit": "never", "wait": "never"}
    # While a config change does start one.
    sv.sh("git", "update-ref", "refs/remotes/origin/main", f"{experiments['commits']['happy']}^", cwd=checkout)
    sv.sh("git", "checkout", "-q", experiments["commits"]["happy"], cwd=checkout)
    assert planned_jobs(checkout) == {"validate": "on_success", "submit": "on_success", "wait": "on_success"}


def planned_jobs(checkout: Path, *extra: str) -> dict[str, str]:
    listed = sv.sh(sv.GITLAB_CI_LOCAL, "--file", "ci/.gitlab-ci.yml", "--list-json", *extra, cwd=checkout).stdout
    start = 0 if listed.startswith("[") else listed.index("\n[") + 1  # after any warnings
    return {job["name"]: job["when"] for job in json.loads(listed[start:])}


# 3. secrets --------------------------------------------------------------------------------------
def test_no_secret_in_any_artefact(stack, experiments):
    secrets = [v.encode() for v in stack.keys.secrets()]
    checked = 0
    # Every file the stack produced: watcher logs and worktrees (results, err files, snakemake
    # logs, .dvc/config), CI checkouts and gitlab-ci-local output, DVC caches, clones.
    for path in stack.root.rglob("*"):
        if path.is_file() and not path.is_symlink() and "seaweedfs" not in path.relative_to(stack.root).parts:
            data = path.read_bytes()
            checked += 1
            for secret in secrets:
                assert secret not in data, f"a secret in {path}"
    assert checked > 500
    # Every object in the bucket: status objects, leases, submissions, DVC's store.
    s3 = stack.s3.client()
    for key in stack.s3.keys():
        data = s3.get_object(Bucket=stack.s3.bucket, Key=key)["Body"].read()
        for secret in secrets:
            assert secret not in data, f"a secret in s3://{stack.s3.bucket}/{key}"
    # Every object in the git remote, every commit message included.
    objects = subprocess.run(["timeout", "-k", "10", "120", "git", "cat-file", "--batch-all-objects", "--batch"],
                             cwd=stack.bare, capture_output=True, check=True).stdout  # fmt: skip
    assert b"Geofm-Results: happy" in objects  # commit messages are in there
    for secret in secrets:
        assert secret not in objects
    # The workflow really ran with them (the checks above are not vacuous).
    assert experiments["status"]["happy"]["state"] == "succeeded"


def test_no_submitted_value_reached_a_shell(stack, experiments):
    for name in ("PWNED", "PWNED2", "PWNED3"):
        assert not list(stack.root.rglob(name)), name
        assert not Path(name).exists()
    assert os.path.exists(stack.worktree(experiments["sids"]["happy"]) / "results" / "happy" / "out" / "summary.json")
