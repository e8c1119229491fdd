"""Leases: which watcher runs a submission (`<prefix>/leases/<id>.json`).

- claim: a conditional put (`If-None-Match: *`): of several watchers exactly one wins.
- renew: a conditional put on the ETag the holder wrote (`If-Match`); a lost race means
  another watcher took the lease over.
- stale: a lease whose ETag this watcher has seen unchanged for longer than its TTL is taken
  over with `If-Match` (again exactly one wins). A restarted watcher (same name and host)
  takes its own dead predecessor's lease at once.
- fence: the holder stops its run once renewals have failed for more than half the TTL, so
  that it has stopped before anyone can see its lease as stale. Before versioning and before
  the final status it re-reads the lease (`holds`): its token must still be there.
- release: a conditional delete (`If-Match`), so a holder never deletes someone else's lease.

A malformed lease (not JSON, not a mapping, missing fields, oversized) is quarantined and
deleted conditionally; the next round claims the submission normally.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geofm import names
from geofm.store import Malformed, PreconditionFailed, Store, TooLarge, now, parse_json

MAX_LEASE_BYTES = 4096


@dataclass
class Lease:
    sid: str
    key: str
    token: str
    etag: str
    ttl: float
    renewed: float = field(default_factory=time.monotonic)  # last successful write (monotonic)


def alive(pid) -> bool:
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


def parse_lease(data: bytes) -> dict:
    doc = parse_json(data, "lease")
    problems = [
        key
        for key, ok in (
            ("owner", names.valid(names.WATCHER_NAME, doc.get("owner"))),
            ("host", isinstance(doc.get("host"), str) and 0 < len(doc["host"]) <= 255),
            ("pid", isinstance(doc.get("pid"), int) and not isinstance(doc.get("pid"), bool)),
            ("token", isinstance(doc.get("token"), str) and 0 < len(doc["token"]) <= 64),
            ("ttl_s", isinstance(doc.get("ttl_s"), int | float) and 0 < doc["ttl_s"] < 10**7),
        )
        if not ok
    ]
    if problems:
        raise Malformed(f"lease: missing or invalid {', '.join(problems)}")
    return doc


class Leases:
    def __init__(self, store: Store, name: str, host: str, ttl: float, log: Callable[[str], None]):
        self.store, self.name, self.host, self.ttl, self.log = store, name, host, ttl, log
        self.pid = os.getpid()
        self.seen: dict[str, tuple[str, float]] = {}  # sid -> (etag, first seen, monotonic)

    def _body(self, token: str, **extra) -> bytes:
        doc = {"owner": self.name, "host": self.host, "pid": self.pid, "token": token, "ttl_s": self.ttl,
               "renewed_at": now(), **extra}  # fmt: skip
        return json.dumps(doc, indent=2).encode()

    def _stale(self, sid: str, etag: str, ttl: float) -> bool:
        """True once this watcher has seen the same lease ETag for longer than its TTL."""
        first = self.seen.get(sid)
        if first is None or first[0] != etag:
            self.seen[sid] = (etag, time.monotonic())
            return False
        return time.monotonic() - first[1] > ttl

    def forget(self, keep: list[str] | None = None) -> None:
        """Staleness is judged only from uninterrupted observation: drop what we saw."""
        self.seen = {k: v for k, v in self.seen.items() if keep is not None and k in keep}

    def claim(self, sid: str) -> Lease | None:
        key = self.store.lease_key(sid)
        token = uuid.uuid4().hex
        try:
            etag = self.store.put(key, self._body(token, acquired_at=now()), if_none_match=True)
            self.seen.pop(sid, None)
            return Lease(sid, key, token, etag, self.ttl)
        except PreconditionFailed:
            pass
        try:
            body, etag = self.store.get(key, MAX_LEASE_BYTES)
            current = parse_lease(body)
        except KeyError:
            return None  # released meanwhile: the next round claims it
        except (Malformed, TooLarge) as e:
            self._quarantine(sid, key, str(e))
            return None
        mine = current["owner"] == self.name and current["host"] == self.host
        dead = mine and (current["pid"] == self.pid or not alive(current["pid"]))
        ttl = min(float(current["ttl_s"]), 10 * self.ttl)  # a huge TTL must not block the queue for ever
        if not dead and not self._stale(sid, etag, ttl):
            return None
        body = self._body(token, acquired_at=now(), taken_over_from=current["owner"])
        try:
            new = self.store.put(key, body, if_match=etag)
        except PreconditionFailed:
            return None  # another watcher took it first
        why = "its previous holder (this watcher) is gone" if dead else f"not renewed for {ttl:g} s"
        self.log(f"took over the lease of {sid} from {current['owner']}: {why}")
        self.seen.pop(sid, None)
        return Lease(sid, key, token, new, self.ttl)

    def _quarantine(self, sid: str, key: str, reason: str) -> None:
        etag = self.store.etag(key)
        if etag is None:
            return
        try:
            body = self.store.get(key, MAX_LEASE_BYTES)[0]
        except (TooLarge, KeyError):
            body = None
        self.log(f"quarantined the lease of {sid}: {reason}")
        self.store.quarantine(sid, "lease.json", reason, body, self.name)
        try:
            self.store.delete(key, if_match=etag)
        except PreconditionFailed:
            pass  # replaced meanwhile: judged again next round

    def renew(self, lease: Lease) -> bool:
        """Renew; False when another watcher holds the lease now. Raises Unavailable."""
        try:
            lease.etag = self.store.put(lease.key, self._body(lease.token), if_match=lease.etag)
        except PreconditionFailed:
            if not self.holds(lease):
                return False
        lease.renewed = time.monotonic()
        return True

    def holds(self, lease: Lease) -> bool:
        """The lease still carries this holder's token (updates the known ETag). Raises Unavailable."""
        try:
            body, etag = self.store.get(lease.key, MAX_LEASE_BYTES)
            held = parse_lease(body)["token"] == lease.token
        except (KeyError, Malformed, TooLarge):
            return False
        if held:
            lease.etag = etag  # our renewal went through but its answer was lost
        return held

    def release(self, lease: Lease) -> None:
        try:
            self.store.delete(lease.key, if_match=lease.etag)
        except PreconditionFailed:
            pass  # not ours any more (or gone): leave it alone


class Keeper(threading.Thread):
    """Renews one lease while its submission is handled, and runs `tick` after each renewal.

    Fences the holder (`fenced` set, `on_fence(reason)` called once) when the lease was taken
    over or when renewals have failed for more than half the TTL.
    """

    def __init__(self, leases: Leases, lease: Lease, on_fence: Callable[[str], None], tick: Callable[[], None],
                 interval: float):  # fmt: skip
        super().__init__(daemon=True, name=f"lease-{lease.sid}")
        self.leases, self.lease, self.on_fence, self.tick = leases, lease, on_fence, tick
        self.interval = max(0.2, min(interval, lease.ttl / 6))
        self.done = threading.Event()
        self.fenced = threading.Event()
        self.lock = threading.Lock()
        self.reason = ""

    def overdue(self) -> float | None:
        """Seconds without renewal when that is over half the TTL (time to fence), else None.
        Checked from outside too (the runner's watchdog): a renewal call that hangs must not
        delay the fence."""
        failing = time.monotonic() - self.lease.renewed
        return failing if failing > self.lease.ttl / 2 else None

    def fence(self, reason: str) -> None:
        with self.lock:
            first = not self.fenced.is_set()
            if first:
                self.reason = reason
                self.fenced.set()
        if first:
            self.leases.log(f"fencing myself off {self.lease.sid}: {reason}; stopping its run")
            self.on_fence(reason)

    def check_overdue(self) -> bool:
        failing = self.overdue()
        if failing is not None:
            self.fence(f"its lease could not be renewed for {failing:.0f} s (over half its TTL)")
        return self.fenced.is_set()

    def run(self) -> None:
        """Every interval: fence if overdue, else start a renewal unless one is still running
        (a renewal that hangs must not delay the fence)."""
        renewing: threading.Thread | None = None
        while not self.done.wait(self.interval):
            if self.check_overdue():
                return
            if renewing is None or not renewing.is_alive():
                renewing = threading.Thread(target=self._renew_once, daemon=True, name=f"renew-{self.lease.sid}")
                renewing.start()

    def _renew_once(self) -> None:
        try:
            renewed = self.leases.renew(self.lease)
            if self.done.is_set():
                return  # the submission was finished (and its lease released) meanwhile
            if not renewed:
                self.fence("another watcher holds its lease now")
                return
        except Exception as e:  # noqa: BLE001 - keep renewing whatever happens
            if self.done.is_set():
                return
            failing = time.monotonic() - self.lease.renewed
            self.leases.log(
                f"renewing the lease of {self.lease.sid} failed ({type(e).__name__}: {e}); "
                f"no renewal for {failing:.0f} s"
            )
            return
        if self.done.is_set() or self.fenced.is_set():
            return
        try:
            self.tick()
        except Exception as e:  # noqa: BLE001 - a failed progress update is not fatal
            self.leases.log(f"updating {self.lease.sid} failed ({type(e).__name__}: {e})")

    def stop(self) -> None:
        self.done.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(60)
