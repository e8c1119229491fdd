"""A throwaway PostgreSQL cluster for tests: Debian's postgresql package (tests/setup-system.sh),
its own data folder and a free port on loopback, started as the `postgres` user (the server
refuses to run as root) and stopped by the PID in its postmaster.pid."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services import free_ports


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} not found; fix: run tests/setup-system.sh (installs postgresql)")
    return found[-1]


class Postgres:
    """`start()` then `url`; `stop()` sends the postmaster SIGINT (fast shutdown) and waits."""

    def __init__(self) -> None:
        # Under /tmp (not pytest's tmp_path): the postgres user must be able to enter the folders.
        self.root = Path(tempfile.mkdtemp(prefix="geofm-pg-"))
        self.data, self.socket = self.root / "data", self.root / "socket"
        self.port = free_ports(1)[0]
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str, timeout: float = 120) -> None:
        result = subprocess.run(
            ["timeout", "-k", "10", str(int(timeout)), "runuser", "-u", "postgres", "--", *cmd],
            capture_output=True, text=True, cwd=self.root,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> Postgres:
        user = pwd.getpwnam("postgres")
        self.socket.mkdir()
        os.chown(self.root, user.pw_uid, user.pw_gid)
        os.chown(self.socket, user.pw_uid, user.pw_gid)
        self._as_postgres(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.socket} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            _bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)  # raises once the postmaster is gone
                    time.sleep(0.2)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)
