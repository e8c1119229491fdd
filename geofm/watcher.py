"""The COS watcher: turns submissions in object storage into Snakemake runs on the cluster.

HPC login nodes accept no inbound connections, so the cluster pulls its work: the watcher
polls `<prefix>/queue/` (geofm.cos), oldest submission first, and for each one

1. claims it with a lease written by a conditional put (`IfNoneMatch="*"`): of several
   watchers on one bucket exactly one wins. The holder renews the lease (`IfMatch` on the
   ETag it wrote) while it runs; a lease whose ETag has not changed for its TTL, as observed
   by another watcher, is stale and taken over with `IfMatch` (again exactly one wins). A
   restarted watcher (same --name, same host) takes its own dead predecessor's lease at once;
2. checks out the submitted commit in its own git worktree (`<home>/worktrees/<id>`), so that
   code and config match, and checks that the uploaded config is byte-identical to the file
   in that commit;
3. runs `snakemake` there with the configured profile and `versioning` switched on, so the
   results are versioned (DVC + git, rules/version.smk) as part of the run. When the run
   fails, a second call (`snakemake version_evidence --force`) versions the evidence;
4. keeps `status.json` current (queued, running with progress, succeeded or failed, with
   timestamps, the summary, error excerpts and the results commit) for the CI wait job.

SIGTERM stops the run cleanly (Snakemake's own shutdown), puts the submission back to
`queued` and releases the lease. After a crash the next start resumes the same worktree with
`--rerun-incomplete`. While the object store is unreachable the watcher waits with
exponential backoff; it never drops a submission because of an outage.

Submitted values are data: no value from a submission reaches a shell (every command is an
argument list), the commit must be a full SHA that exists in the configured remote, the
branch and experiment names are checked, and results/scratch/cache paths must stay inside
the worktree.
"""

from __future__ import annotations

import collections
import ctypes
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from geofm import cos
from geofm.config import SAFE_NAME
from geofm.versioning import COMMIT, SAFE_BRANCH, Runner, VersioningError, clean_experiment, git_env, secrets_of

SAFE_CONFIG_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,200}\.ya?ml$")
PROGRESS = re.compile(r"(\d+) of (\d+) steps \((\d+)%\) done")
PATH_KEYS = (("results_dir",), ("scratch_dir",), ("cache_dir",), ("sample_data", "root"))


class SubmissionError(Exception):
    """The submission cannot run as submitted (reported as failed; never retried)."""


@dataclass
class Settings:
    repo: Path
    home: Path
    store: cos.Store
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getuid()}")
    remote: str = "origin"
    profile: str | None = None
    cores: str = "all"
    poll_s: float = 30.0
    lease_ttl_s: float = 600.0
    max_backoff_s: float = 300.0
    stop_timeout_s: float = 120.0
    keep_worktrees: int = 10
    snakemake: str = str(Path(sys.executable).parent / "snakemake")
    snakemake_args: list[str] = field(default_factory=list)
    once: bool = False


def path_problem(config: dict) -> str | None:
    """Why a config's output paths would leave the run's folder (None if they do not).

    `config` is a config with defaults filled in. Results, scratch, cache and sample data
    paths must be relative and must not climb out ('..'); dataset roots are only read.
    """
    name = config.get("experiment")
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
        return f"experiment: {name!r} is not a safe folder name; fix: use letters, digits, '.', '_' or '-'"
    for keys in PATH_KEYS:
        value = config
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        key = ".".join(keys)
        if not isinstance(value, str) or not value:
            return f"{key}: must be a relative folder name; fix: remove it to use the default"
        p = PurePosixPath(value)
        if p.is_absolute() or ".." in p.parts or "\\" in value or value.startswith("~"):
            return (
                f"{key}: {value!r} leaves the run's folder; fix: use a relative path without '..' "
                "(the watcher runs each submission in its own checkout)"
            )
    return None


def config_with_defaults(raw: dict, schema: dict) -> dict:
    """Top-level and sample_data defaults from a schema (enough for `path_problem`)."""
    props = schema.get("properties", {})
    config = {k: v.get("default") for k, v in props.items() if "default" in v}
    sample = {k: v.get("default") for k, v in props.get("sample_data", {}).get("properties", {}).items()}
    config.update(raw)
    given = raw.get("sample_data")
    config["sample_data"] = {**sample, **given} if isinstance(given, dict) else (sample if given is None else given)
    return config


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the watcher dies, so a crash leaves no orphan run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Lease:
    def __init__(self, key: str, etag: str, token: str):
        self.key, self.etag, self.token = key, etag, token


class Watcher:
    def __init__(self, settings: Settings):
        self.s = settings
        self.store = settings.store
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.stop = threading.Event()  # shutdown requested (SIGTERM / SIGINT)
        self.lost = threading.Event()  # another watcher took over the current lease
        self.seen: dict[str, tuple[str, float]] = {}
        self.child: subprocess.Popen | None = None
        self.status: dict = {}
        self.status_lock = threading.Lock()
        self.progress: str | None = None
        self.secrets = secrets_of(dict(os.environ))
        for sub in ("worktrees", "logs", "runs", "finished", "resources"):
            (settings.home / sub).mkdir(parents=True, exist_ok=True)

    # logging ------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} watcher {self.s.name}: {cos.scrub(message, self.secrets)}", file=sys.stderr, flush=True)

    # S3 with retries --------------------------------------------------------------------------
    def s3(self, fn, what: str):
        """fn() retried with backoff while the store is unavailable. Gives up only when the
        watcher is shutting down (after stop_timeout_s), raising cos.Unavailable."""
        backoff = cos.Backoff(1.0, self.s.max_backoff_s)
        give_up = None
        while True:
            try:
                return fn()
            except cos.Unavailable as e:
                if self.stop.is_set():
                    give_up = give_up or time.monotonic() + min(30.0, self.s.stop_timeout_s)
                    if time.monotonic() >= give_up:
                        raise
                delay = backoff.next()
                self.log(f"object store unavailable during {what} ({e}); retrying in {delay:.1f} s")
                time.sleep(delay if not self.stop.is_set() else min(delay, 2.0))

    # main loop ------------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.log(
            f"watching s3://{self.store.bucket}/{self.store.prefix}/queue/ every {self.s.poll_s:g} s "
            f"(repo {self.s.repo}, home {self.s.home}, pid {self.pid})"
        )
        backoff = cos.Backoff(1.0, self.s.max_backoff_s)
        while not self.stop.is_set():
            try:
                queued = self.store.queued()
                if backoff.failures:
                    self.log("object store reachable again")
                backoff.reset()
            except cos.Unavailable as e:
                self.seen.clear()  # staleness is only judged from uninterrupted observation
                delay = backoff.next()
                self.log(f"object store unavailable ({e}); retrying in {delay:.1f} s")
                self.stop.wait(delay)
                continue
            self.seen = {k: v for k, v in self.seen.items() if k in queued}
            handled = False
            for sid in queued:
                if self.stop.is_set():
                    break
                try:
                    lease = self.claim(sid)
                except cos.Unavailable as e:
                    self.log(f"object store unavailable while claiming {sid} ({e})")
                    break
                if lease is not None:
                    try:
                        self.process(sid, lease)
                    except cos.Unavailable:  # only while shutting down: the lease expires by itself
                        self.log(f"object store unreachable while stopping; {sid} resumes on the next start")
                    handled = True
                    break  # list again: the queue may have changed meanwhile
            if self.s.once and handled:
                break
            if not handled:
                self.stop.wait(self.s.poll_s)
        self.log("stopped")
        return 0

    def _on_signal(self, signum, _frame) -> None:
        self.log(f"received {signal.Signals(signum).name}: finishing cleanly")
        self.stop.set()
        self._terminate_child()

    # leases ---------------------------------------------------------------------------------
    def _lease_body(self, token: str, **extra) -> bytes:
        stamp = cos.now()
        doc = {
            "owner": self.s.name,
            "host": self.host,
            "pid": self.pid,
            "token": token,
            "ttl_s": self.s.lease_ttl_s,
            "renewed_at": stamp,
            **extra,
        }
        return json.dumps(doc, indent=2).encode()

    def _stale(self, sid: str, etag: str, ttl: float) -> bool:
        """True once this watcher has seen the same lease ETag for longer than its TTL."""
        first = self.seen.get(sid)
        if first is None or first[0] != etag:
            self.seen[sid] = (etag, time.monotonic())
            return False
        return time.monotonic() - first[1] > ttl

    def claim(self, sid: str) -> Lease | None:
        key = self.store.key(sid, "lease.json")
        token = uuid.uuid4().hex
        try:
            etag = self.store.put(key, self._lease_body(token, acquired_at=cos.now()), if_none_match=True)
            lease = Lease(key, etag, token)
        except cos.PreconditionFailed:
            found = self.store.get_json(key)
            if found is None:
                return None  # released meanwhile: the next round claims it
            current, etag = found
            mine = current.get("owner") == self.s.name and current.get("host") == self.host
            dead = mine and (current.get("pid") == self.pid or not _alive(current.get("pid")))
            try:
                ttl = float(current.get("ttl_s", self.s.lease_ttl_s))
            except (TypeError, ValueError):
                ttl = self.s.lease_ttl_s
            if not dead and not self._stale(sid, etag, ttl):
                return None
            body = self._lease_body(token, acquired_at=cos.now(), taken_over_from=str(current.get("owner")))
            try:
                new = self.store.put(key, body, if_match=etag)
            except cos.PreconditionFailed:
                return None  # another watcher took it first
            why = "its previous holder (this watcher) is gone" if dead else f"not renewed for {ttl:g} s"
            self.log(f"took over the lease of {sid} from {current.get('owner')}: {why}")
            lease = Lease(key, new, token)
        self.seen.pop(sid, None)
        status = self.store.status(sid) or {}
        if status.get("state") in cos.TERMINAL:  # finished before a crash could clean up
            self.store.delete(self.store.queue_key(sid))
            self.store.delete(key)
            return None
        return lease

    def _heartbeat(self, sid: str, lease: Lease, done: threading.Event) -> None:
        interval = max(0.5, self.s.lease_ttl_s / 6)
        while not done.wait(interval):
            try:
                try:
                    lease.etag = self.store.put(lease.key, self._lease_body(lease.token), if_match=lease.etag)
                except (cos.PreconditionFailed, KeyError):
                    found = self.store.get_json(lease.key)
                    if found is None or found[0].get("token") != lease.token:
                        self.log(f"lost the lease of {sid} to another watcher: stopping this run")
                        self.lost.set()
                        self._terminate_child()
                        return
                    lease.etag = found[1]  # our renewal went through but its answer was lost
                    continue
            except cos.Unavailable as e:
                self.log(f"object store unavailable while renewing the lease of {sid} ({e}); will retry")
                continue
            except Exception as e:  # noqa: BLE001 - keep renewing whatever happens
                self.log(f"renewing the lease of {sid} failed ({type(e).__name__}: {e}); will retry")
                continue
            if self.progress and self.status.get("progress") != self.progress:
                try:
                    self.write_status(progress=self.progress)
                except cos.Unavailable:
                    pass

    # status ---------------------------------------------------------------------------------
    def write_status(self, state: str | None = None, **fields) -> None:
        with self.status_lock:
            stamp = cos.now()
            if state and state != self.status.get("state"):
                self.status.setdefault("history", []).append({"state": state, "at": stamp})
                self.status["state"] = state
            self.status.update(fields, updated_at=stamp)
            body = cos.scrub(json.dumps(self.status, indent=2, sort_keys=True), self.secrets).encode()
            key = self.store.key(self.status["submission"], "status.json")
            self.store.put(key, body)

    # one submission -----------------------------------------------------------------------
    def process(self, sid: str, lease: Lease) -> None:
        self.lost.clear()
        self.progress = None
        previous = self.s3(lambda: self.store.status(sid), "reading the status") or {}
        per_attempt = ("snakemake_started_at", "progress", "finished_at", "message")
        self.status = {**{k: v for k, v in previous.items() if k not in per_attempt}, "submission": sid}
        attempt = int(previous.get("attempt") or 0) + 1
        self.log(f"running {sid} (attempt {attempt})")
        self.s3(
            lambda: self.write_status(
                "running", attempt=attempt, watcher=f"{self.s.name}@{self.host}", started_at=cos.now(),
                message="preparing the worktree",
            ),
            "writing the status",
        )  # fmt: skip
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(sid, lease, done), daemon=True)
        beat.start()
        result: dict = {}
        try:
            result = self._run(sid)
        except SubmissionError as e:
            self.log(f"{sid} rejected: {e}")
            result = {"state": "failed", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - the watcher must survive any single submission
            self.log(f"{sid}: internal error {type(e).__name__}: {e}")
            result = {"state": "failed", "message": f"watcher error: {type(e).__name__}: {e}"}
        finally:
            done.set()
            beat.join()
        if self.lost.is_set():
            return
        if result.get("state") is None:  # interrupted by shutdown: back to the queue
            self.log(f"{sid} interrupted; it resumes when a watcher starts again")
            try:
                self.s3(
                    lambda: self.write_status(
                        "queued", message="interrupted by a watcher shutdown; resumes on restart"
                    ),
                    "writing the status",
                )
                self.s3(lambda: self.store.delete(lease.key), "releasing the lease")
            except cos.Unavailable:
                self.log("object store unreachable at shutdown: the lease expires by itself")
            return
        state = result.pop("state")
        self.s3(lambda: self.write_status(state, finished_at=cos.now(), **result), "writing the final status")
        self.s3(lambda: self.store.delete(self.store.queue_key(sid)), "dequeuing")
        self.s3(lambda: self.store.delete(lease.key), "releasing the lease")
        (self.s.home / "finished" / sid).touch()
        self.log(f"{sid} {state}: {result.get('message', '')}")
        self._prune_worktrees()

    def _run(self, sid: str) -> dict:
        meta = self.s3(lambda: self.store.get_json(self.store.key(sid, "submission.json")), "reading the submission")
        config_bytes = self.s3(lambda: self.store.get(self.store.key(sid, "config.yaml"))[0], "reading the config")
        if meta is None:
            raise SubmissionError("submission.json is missing")
        meta = meta[0]
        commit, branch, config_path = (str(meta.get(k, "")) for k in ("commit", "branch", "config_path"))
        if not COMMIT.match(commit):
            raise SubmissionError(f"commit {commit[:60]!r} is not a full commit id")
        if not SAFE_BRANCH.match(branch):
            raise SubmissionError(f"branch {branch[:60]!r} is not a plain branch name")
        if not SAFE_CONFIG_PATH.match(config_path) or ".." in config_path.split("/"):
            raise SubmissionError(f"config path {config_path[:80]!r} is not a relative .yaml path")
        self.status.update(commit=commit, branch=branch)

        wt, exp_rel, config = self._prepare(sid, commit, branch, config_path, config_bytes)
        self.status["experiment"] = config["experiment"]
        versioning = {
            "enabled": True,
            "config_commit": commit,
            "branch": branch,
            "git_remote": self.s.remote,
            "submission": sid,
        }
        user = config.get("versioning") if isinstance(config.get("versioning"), dict) else {}
        versioning = {**{k: v for k, v in user.items() if k not in versioning}, **versioning}
        log_path = self.s.home / "logs" / f"{sid}.log"
        scratch = wt / config["scratch_dir"] / config["experiment"] / "versioning"

        self._reap_orphan(sid)
        if any((wt / ".snakemake" / "locks").glob("*")):
            self._snakemake(sid, wt, config_path, versioning, log_path, ["--unlock"])
        self.s3(
            lambda: self.write_status(message="running snakemake", snakemake_started_at=cos.now()),
            "writing the status",
        )
        rc, tail = self._snakemake(sid, wt, config_path, versioning, log_path, [])
        receipt = scratch / "version.json"
        if rc == 0 and receipt.is_file():
            state, message = "succeeded", "all cells finished; results versioned"
        elif self.stop.is_set() or self.lost.is_set():
            return {}
        else:
            self.log(f"{sid}: snakemake exited with {rc}; versioning the evidence")
            self.s3(lambda: self.write_status(message="run failed; versioning the evidence"), "writing the status")
            receipt = scratch / "evidence.json"
            receipt.unlink(missing_ok=True)
            rc2, tail2 = self._snakemake(sid, wt, config_path, versioning, log_path, ["version_evidence", "--force"])
            if rc2 != 0 and (self.stop.is_set() or self.lost.is_set()):
                return {}
            state = "failed"
            message = f"snakemake exited with status {rc}"
            said = [line for line in tail if line.startswith("config error: ")]
            if said:  # the workflow rejected the config before planning (e.g. a dataset layout)
                message = said[-1]
            if rc2 != 0:
                message += "; versioning the evidence failed too (see log_tail)"
                tail = tail + ["--- version_evidence ---"] + tail2
        return {"state": state, "message": message, **self._report(wt, exp_rel, receipt, tail, state)}

    def _report(self, wt: Path, exp_rel: Path, receipt: Path, tail: list[str], state: str) -> dict:
        exp = wt / exp_rel
        report: dict = {"results_commit": None, "results_path": str(exp_rel), "summary": [], "errors": []}
        try:
            r = json.loads(receipt.read_text())
            report.update(results_commit=r.get("results_commit"), dvc_files=r.get("dvc_files", []))
        except (OSError, ValueError):
            pass
        try:
            rows = json.loads((exp / "out" / "summary.json").read_text()).get("rows", [])
            keep = ("task", "model", "seed", "status", "headline_metric", "headline", "baseline", "beats_baseline",
                    "error", "metrics")  # fmt: skip
            report["summary"] = [{k: row.get(k) for k in keep} for row in rows]
        except (OSError, ValueError, AttributeError):
            pass
        for err in sorted((exp / "err").glob("*.err"))[:20]:
            text = err.read_text(errors="replace")
            head, _, rest = text.partition("\n--- traceback ---\n")
            trace = rest.split("\n--- last ")[0].strip().splitlines()[-8:]
            excerpt = head.strip() + ("\n--- traceback (last lines) ---\n" + "\n".join(trace) if trace else "")
            report["errors"].append({"file": str(err.relative_to(wt)), "excerpt": excerpt[-3000:]})
        if state != "succeeded":
            report["log_tail"] = "\n".join(tail[-40:])
        return report

    def _prepare(self, sid: str, commit: str, branch: str, config_path: str, config_bytes: bytes):
        wt = self.s.home / "worktrees" / sid
        git = Runner(self.s.repo, log=self.log)
        fresh = not (wt / ".git").exists()
        if fresh:
            for attempt in range(3):
                fetched = git("git", "fetch", "--quiet", self.s.remote,
                              f"+refs/heads/{branch}:refs/remotes/{self.s.remote}/{branch}", check=False, timeout=900)  # fmt: skip
                if fetched.returncode == 0 or self.stop.is_set():
                    break
                self.log(f"git fetch failed (attempt {attempt + 1} of 3)")
                self.stop.wait(5 * 2**attempt)
            known = git("git", "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0
            if not known:  # no longer on the branch (force-pushed?): ask for the commit itself
                git("git", "fetch", "--quiet", self.s.remote, commit, check=False, timeout=900)
                if git("git", "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
                    raise SubmissionError(f"commit {commit} is not in {self.s.remote}: was it pushed?")
            if wt.exists():
                shutil.rmtree(wt)
            git("git", "worktree", "prune")
            git("git", "worktree", "add", "--quiet", "--detach", str(wt), commit)
        else:
            head = Runner(wt, log=self.log)("git", "rev-parse", "HEAD", quiet=True).stdout.strip()
            if head != commit:
                raise SubmissionError(f"worktree {wt} is at {head}, not {commit}")
            self.log(f"resuming in {wt}")
        shown = subprocess.run(
            ["git", "show", f"{commit}:{config_path}"], cwd=wt, capture_output=True, timeout=60, env=git_env()
        )
        if shown.returncode != 0:
            raise SubmissionError(f"{config_path} does not exist in commit {commit}")
        if shown.stdout != config_bytes:
            raise SubmissionError(f"the uploaded config differs from {config_path} in commit {commit}")
        try:
            raw = yaml.safe_load(config_bytes) or {}
            schema = yaml.safe_load((wt / "config" / "schema.yaml").read_text())
        except (yaml.YAMLError, OSError) as e:
            raise SubmissionError(f"{config_path}: not readable YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise SubmissionError(f"{config_path}: not a mapping of settings")
        config = config_with_defaults(raw, schema)
        problem = path_problem(config)
        if problem:
            raise SubmissionError(f"config error: {problem}")
        exp_rel = Path(config["results_dir"]) / config["experiment"]
        for key in ("results_dir", "scratch_dir"):
            real = (wt / config[key]).resolve()
            if real != wt.resolve() and wt.resolve() not in real.parents:
                raise SubmissionError(f"{key}: {config[key]!r} resolves outside the worktree (a symbolic link?)")
        if fresh:
            # Results checked out from an earlier run of this experiment would be mistaken for
            # this run's outputs: a submission starts from an empty experiment folder.
            clean_experiment(wt, exp_rel)
            if not (wt / "resources").exists():  # shared caches: weights, registry, sample data
                (wt / "resources").symlink_to(self.s.home / "resources", target_is_directory=True)
        return wt, exp_rel, config

    # snakemake ------------------------------------------------------------------------------
    def _snakemake(self, sid, wt: Path, config_path: str, versioning: dict, log_path: Path, extra: list[str]):
        targets = [a for a in extra if not a.startswith("-")]
        flags = [a for a in extra if a.startswith("-")]
        cmd = [self.s.snakemake, *targets, "--snakefile", str(wt / "Snakefile"), "--directory", str(wt)]
        cmd += ["--cores", str(self.s.cores), "--rerun-incomplete", *flags]
        if self.s.profile:
            cmd += ["--profile", self.s.profile]
        cmd += self.s.snakemake_args
        # The watcher's settings travel as a second config file: typed data, never a shell string.
        settings = self.s.home / "runs" / f"{sid}.versioning.yaml"
        settings.write_text(yaml.safe_dump({"versioning": versioning}, sort_keys=True))
        cmd += ["--configfile", str(wt / config_path), str(settings)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(wt), os.environ.get("PYTHONPATH")])),
            "LIGHTLY_DID_VERSION_CHECK": "True",
        }
        env.pop("GIT_INDEX_FILE", None)
        tail: collections.deque[str] = collections.deque(maxlen=200)
        with open(log_path, "a", buffering=1) as log:
            log.write(f"\n### {cos.now()} {' '.join(cmd)}\n")
            self.child = subprocess.Popen(
                cmd, cwd=wt, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", start_new_session=True, preexec_fn=_set_pdeathsig,
            )  # fmt: skip
            pidfile = self.s.home / "runs" / f"{sid}.json"
            pidfile.write_text(json.dumps({"pid": self.child.pid, "start": _start_time(self.child.pid)}))
            if self.stop.is_set() or self.lost.is_set():
                self._terminate_child()
            for line in self.child.stdout:
                line = cos.scrub(line.rstrip("\n"), self.secrets)
                log.write(line + "\n")
                tail.append(line)
                m = PROGRESS.search(line)
                if m:
                    self.progress = f"{m.group(1)} of {m.group(2)} steps ({m.group(3)}%)"
            rc = self.child.wait()
            self.child = None
            pidfile.unlink(missing_ok=True)
        return rc, list(tail)

    def _terminate_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return

        def stop_group():
            try:
                os.killpg(child.pid, signal.SIGTERM)  # Snakemake cancels its jobs and exits
                child.wait(self.s.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        threading.Thread(target=stop_group, daemon=True).start()

    def _reap_orphan(self, sid: str) -> None:
        """A run left behind by a crashed watcher must end before this one starts."""
        pidfile = self.s.home / "runs" / f"{sid}.json"
        try:
            info = json.loads(pidfile.read_text())
        except (OSError, ValueError):
            return
        pid = info.get("pid")
        if _alive(pid) and _start_time(pid) == info.get("start"):
            self.log(f"stopping the run (pid {pid}) left behind by a previous watcher")
            try:
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + self.s.stop_timeout_s
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.5)
                if _alive(pid):
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile.unlink(missing_ok=True)

    def _prune_worktrees(self) -> None:
        finished = sorted(p.name for p in (self.s.home / "finished").iterdir())
        for sid in finished[: max(0, len(finished) - self.s.keep_worktrees)]:
            wt = self.s.home / "worktrees" / sid
            if wt.exists():
                try:
                    Runner(self.s.repo, log=lambda _: None)("git", "worktree", "remove", "--force", str(wt))
                except VersioningError:
                    shutil.rmtree(wt, ignore_errors=True)
            (self.s.home / "finished" / sid).unlink(missing_ok=True)
