"""The Snakemake child: submitted code, run without any of the watcher's credentials.

- Environment: an allow-list (locale, PATH, scheduler and site variables, whatever the
  operator names with --pass-env), never a name that looks like a credential (tokens,
  secrets, keys, passwords, AWS_*, CI_*, GIT_*...) even if the operator names it. SLURM jobs
  (`--export=ALL`) and LSF jobs (`-env all`) inherit this environment, so they carry nothing
  secret either. HOME is the run's own folder.
- Profiles: the operator's, from the watcher's own installation (`--workflow-profile` and
  `--profile` are absolute paths there); the checkout's `profiles/` are never read.
- Optionally runs as another user (`run_as`): as root directly, otherwise through `sudo -n -u`.
- Stops cleanly (SIGTERM to its process group, SIGKILL after `stop_timeout`) on a deadline,
  a cancel marker, a shutdown or a fence; `Result.stopped` says which.
"""

from __future__ import annotations

import collections
import ctypes
import fnmatch
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geofm.store import now, scrub

PROGRESS = re.compile(r"(\d+) of (\d+) steps \((\d+)%\) done")
PASSED = ("PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SLURM_CONF", "LSF_*",
          "CUDA_VISIBLE_DEVICES", "GEOFM_SLURM_*", "GEOFM_LSF_*", "HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT",
          "SNAKEMAKE_LSF_MEMFMT", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")  # fmt: skip
SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|AUTH|(?:\A|_)KEY(?:_|\Z)|\AAWS_|\ACI_|\AGITLAB_|\AGIT_|\ADVC_|"
    r"\AGEOFM_(?:GIT|DVC|ID)_|\ASSH_|\ASNAKEMAKE_PROFILE\Z|\APYTHON",
    re.IGNORECASE,
)


def child_env(environ: dict, passed: tuple[str, ...], home: Path, checkout: Path) -> dict:
    """The child's environment: allow-listed names only, never a credential; the checkout's
    own `geofm` package first on the Python path."""
    patterns = PASSED + tuple(passed)
    env = {k: v for k, v in environ.items() if not SECRET_NAME.search(k) and any(fnmatch.fnmatchcase(k, p) for p in patterns)}  # fmt: skip
    venv_bin = str(Path(sys.executable).parent)  # the watcher's snakemake, python and dvc come first
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"])
    env.update(HOME=str(home), PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1",
               LIGHTLY_DID_VERSION_CHECK="True")  # fmt: skip
    return env


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the watcher dies, so a crash leaves no orphan run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Result:
    rc: int
    tail: list[str]
    stopped: str | None = None  # why the watcher stopped it (deadline, cancelled, shutdown, fenced)


@dataclass
class Runner:
    snakemake: str
    extra_args: list[str] = field(default_factory=list)  # the operator's, after the submission's
    cores: str = "all"
    profile: Path | None = None
    workflow_profile: Path | None = None
    pass_env: tuple[str, ...] = ()
    stop_timeout: float = 120.0
    run_as: str | None = None
    log: Callable[[str], None] = print
    secrets: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.child: subprocess.Popen | None = None
        self.stopped: str | None = None
        self.progress: str | None = None
        self._lock = threading.Lock()

    def command(self, checkout: Path, config_json: Path, extra: list[str]) -> list[str]:
        targets = [a for a in extra if not a.startswith("-")]
        flags = [a for a in extra if a.startswith("-")]
        cmd = [self.snakemake, *targets, "--snakefile", str(checkout / "Snakefile"), "--directory", str(checkout)]
        cmd += ["--cores", str(self.cores), "--rerun-incomplete", *flags]
        cmd += ["--workflow-profile", str(self.workflow_profile) if self.workflow_profile else "none"]
        if self.profile:
            cmd += ["--profile", str(self.profile)]
        return cmd + [*self.extra_args, "--configfile", str(config_json)]

    def _user(self) -> dict:
        if not self.run_as or os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(self.run_as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def run(self, checkout: Path, config_json: Path, run_dir: Path, extra: list[str], *,
            should_stop: Callable[[], str | None], deadline: float) -> Result:  # fmt: skip
        """Snakemake in `checkout`; output to run_dir/snakemake.log. Stops when `should_stop()`
        gives a reason or when time.monotonic() passes `deadline`."""
        home = run_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = child_env(dict(os.environ), self.pass_env, home, checkout)
        cmd = self.command(checkout, config_json, extra)
        if self.run_as and os.geteuid() != 0:
            cmd = ["sudo", "-n", "-u", self.run_as, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd]
        tail: collections.deque[str] = collections.deque(maxlen=200)
        self.stopped = None
        pidfile = run_dir / "snakemake.pid"
        with open(run_dir / "snakemake.log", "a", buffering=1) as out:
            out.write(f"\n### {now()} {' '.join(cmd)}\n")
            with self._lock:
                self.child = subprocess.Popen(
                    cmd, cwd=checkout, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                    preexec_fn=_set_pdeathsig, **self._user(),
                )  # fmt: skip
            pidfile.write_text(json.dumps({"pid": self.child.pid, "start": start_time(self.child.pid)}))
            done = threading.Event()
            watchdog = threading.Thread(target=self._watch, args=(should_stop, deadline, done), daemon=True)
            watchdog.start()
            for line in self.child.stdout:
                line = scrub(line.rstrip("\n"), self.secrets)
                out.write(line + "\n")
                tail.append(line)
                m = PROGRESS.search(line)
                if m:
                    self.progress = f"{m.group(1)} of {m.group(2)} steps ({m.group(3)}%)"
            rc = self.child.wait()
            done.set()
            watchdog.join(5)
            with self._lock:
                self.child = None
        pidfile.unlink(missing_ok=True)
        return Result(rc, list(tail), self.stopped)

    def _watch(self, should_stop: Callable[[], str | None], deadline: float, done: threading.Event) -> None:
        while not done.wait(0.5):
            reason = should_stop() or ("deadline" if time.monotonic() > deadline else None)
            if reason:
                self.stop(reason)
                return

    def stop(self, reason: str) -> None:
        """Stop the running child (SIGTERM to its group; SIGKILL after stop_timeout)."""
        with self._lock:
            child = self.child
            if child is None or child.poll() is not None or self.stopped:
                return
            self.stopped = reason
        self.log(f"stopping snakemake ({reason})")

        def stop_group():
            self._signal(child.pid, signal.SIGTERM)  # Snakemake cancels its jobs and exits
            self._wait_group(child.pid, self.stop_timeout)
            self._signal(child.pid, signal.SIGKILL)  # whatever is left of the group

        threading.Thread(target=stop_group, daemon=True).start()

    @staticmethod
    def _wait_group(pgid: int, timeout: float) -> None:
        """Until no process of the group is left (the leader may exit before its children)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.5)

    def _signal(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's processes, started through sudo
            subprocess.run(["sudo", "-n", "-u", str(self.run_as), "kill", f"-{int(sig)}", "--", f"-{pgid}"],
                           capture_output=True, timeout=30)  # fmt: skip

    def reap_orphan(self, run_dir: Path) -> None:
        """A run left behind by a crashed watcher must end before this one starts."""
        pidfile = run_dir / "snakemake.pid"
        try:
            info = json.loads(pidfile.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        leader = start_time(pid)
        if leader is not None and leader != info.get("start"):
            pidfile.unlink(missing_ok=True)  # that pid is another process now: the old group is gone
            return
        try:
            os.killpg(pid, 0)  # any process of the old group left (its leader may be gone)?
        except ProcessLookupError:
            pidfile.unlink(missing_ok=True)
            return
        except PermissionError:
            pass
        self.log(f"stopping the run (pid {pid}) left behind by a previous watcher")
        self._signal(pid, signal.SIGTERM)
        self._wait_group(pid, self.stop_timeout)
        self._signal(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
