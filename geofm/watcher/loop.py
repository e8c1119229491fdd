"""The watcher's main loop: list the queue, claim the oldest submission it can, handle it.

HPC login nodes accept no inbound connections, so the cluster pulls its work: the watcher
polls `<prefix>/queue/` (geofm.store), oldest first. Each submission is handled in isolation
(geofm.watcher.job): an object that cannot be read is quarantined, an outage puts the
submission back with backoff, and nothing one submission does stops the loop. At start-up
the store must prove that it honours conditional writes (leases depend on them).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from geofm.retry import retry
from geofm.store import Store, Unavailable, scrub
from geofm.versioning import secrets_of
from geofm.watcher.checkout import Mirror, Operator
from geofm.watcher.job import Job
from geofm.watcher.lease import Leases
from geofm.watcher.publish import DvcRemote, Publisher
from geofm.watcher.runner import Runner
from geofm.watcher.token import Verifier


@dataclass
class Settings:
    repo: Path  # the watcher's own clone (trusted; fetched with the watcher's git token)
    home: Path  # runs/<id>/ (checkout, logs, state), finished/ markers
    store: Store
    verifier: Verifier
    runner: Runner
    dvc: DvcRemote
    operator: Operator = field(default_factory=Operator)
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getuid()}")
    remote: str = "origin"
    poll_s: float = 30.0
    lease_ttl_s: float = 600.0
    max_backoff_s: float = 300.0
    deadline_s: float = 7 * 86400.0
    fetch_within_s: float = 1800.0
    push_within_s: float = 600.0
    keep_runs: int = 10
    run_as: str | None = None
    once: bool = False


class Watcher:
    def __init__(self, s: Settings):
        self.s, self.store, self.runner, self.verifier = s, s.store, s.runner, s.verifier
        self.ident = f"{s.name}@{socket.gethostname()}"
        self.stop = threading.Event()
        self.secrets = secrets_of(dict(os.environ)) + (list((s.dvc.credentials or {}).values()))
        self.runner.log, self.runner.secrets = self.log, self.secrets
        self.leases = Leases(s.store, s.name, socket.gethostname(), s.lease_ttl_s, self.log)
        self.mirror = Mirror(s.repo, s.remote, self.log, self.stop, s.max_backoff_s, s.fetch_within_s)
        self.publisher = Publisher(self.mirror, s.dvc, log=self.log, stop=self.stop, max_backoff=s.max_backoff_s,
                                   push_within=s.push_within_s)  # fmt: skip
        self.waiting: dict[str, tuple[float, int]] = {}  # sid -> (not before, failures): backoff per submission
        self.broken: dict[str, int] = {}  # sid -> unexpected errors in a row
        (s.home / "runs").mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} watcher {self.s.name}: {scrub(message, self.secrets)}", file=sys.stderr, flush=True)

    def s3(self, fn, what: str):
        """fn() retried while the store is unavailable; gives up at once on shutdown, except
        for the writes a shutdown itself needs (30 s then)."""
        if self.stop.is_set():
            return retry(fn, what=what, log=self.log, on=(Unavailable,), first=1.0, cap=5.0, within=30.0)
        return retry(fn, what=what, log=self.log, on=(Unavailable,), stop=self.stop, cap=self.s.max_backoff_s)

    def later(self, sid: str) -> None:
        failures = self.waiting.get(sid, (0.0, 0))[1] + 1
        delay = min(self.s.max_backoff_s, self.s.poll_s * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
        self.waiting[sid] = (time.monotonic() + delay, failures)

    def own_run_dir(self, run_dir: Path) -> None:
        """With run_as, the run's folder belongs to that user (it writes only there)."""
        if self.s.run_as and os.geteuid() == 0:
            for path in [run_dir, *run_dir.rglob("*")]:
                shutil.chown(path, self.s.run_as, None) if not path.is_symlink() else None

    # the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            problem = self.s3(lambda: self.store.probe_conditional_writes(self.s.name), "probing the object store")
        except Unavailable:
            return 0  # stopped while the store was unreachable
        if problem:
            print(f"watcher: refusing to start: the object store at {self.store.endpoint_url or 'AWS'} does not "
                  f"honour conditional writes ({problem}), so leases would not be exclusive", file=sys.stderr)  # fmt: skip
            return 2
        self.log(f"watching s3://{self.store.bucket}/{self.store.prefix}/queue/ every {self.s.poll_s:g} s "
                 f"(clone {self.s.repo}, home {self.s.home}, pid {os.getpid()})")  # fmt: skip
        while not self.stop.is_set():
            try:
                queued = self.s3(self.store.queued, "listing the queue")
            except Unavailable:
                break
            self.leases.forget(keep=queued)
            handled = any(self._one(sid) for sid in queued if self._due(sid))
            if self.s.once and handled:
                break
            if not handled:
                self.stop.wait(self.s.poll_s)
        self.log("stopped")
        return 0

    def _due(self, sid: str) -> bool:
        return not self.stop.is_set() and self.waiting.get(sid, (0.0, 0))[0] <= time.monotonic()

    def _one(self, sid: str) -> bool:
        """Claim and handle one submission; True when it was ours to handle."""
        lease = None
        try:
            lease = self.s3(lambda: self.leases.claim(sid), f"claiming {sid}")
            if lease is None:
                return False
            Job(self, sid, lease).handle()
            self.broken.pop(sid, None)
        except Unavailable as e:
            self.log(f"{sid}: object store unavailable ({e}); trying again later")
            self.later(sid)
        except Exception as e:  # noqa: BLE001 - one submission never stops the loop
            n = self.broken[sid] = self.broken.get(sid, 0) + 1
            self.log(f"{sid}: watcher error {type(e).__name__}: {e} (time {n})\n{traceback.format_exc()}")
            self.later(sid)
            try:
                if n >= 3:  # not an outage: a submission that trips the watcher every time
                    Job(self, sid, lease)._finish("failed", f"watcher error: {type(e).__name__}: {e}")
                else:
                    self.leases.release(lease)
            except Exception as again:  # noqa: BLE001
                self.log(f"{sid}: could not record the error ({type(again).__name__}); its lease expires by itself")
        return True

    def _on_signal(self, signum, _frame) -> None:
        self.log(f"received {signal.Signals(signum).name}: finishing cleanly")
        self.stop.set()
        self.runner.stop("shutdown")

    def prune(self) -> None:
        """Keep the last keep_runs finished runs; never one whose results still wait for a push."""
        marks = self.s.home / "finished"
        finished = sorted(marks.iterdir(), key=lambda p: p.stat().st_mtime) if marks.is_dir() else []
        for mark in finished[: max(0, len(finished) - self.s.keep_runs)]:
            run_dir = self.s.home / "runs" / mark.name
            if not (run_dir / "pending.json").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                mark.unlink(missing_ok=True)
