"""One submission, from a claimed lease to its final status, in isolation.

Order: status (malformed: quarantined) -> submission objects (capped; malformed: quarantined,
failed) -> ID token (refused: failed, nothing fetched or run) -> cancel marker -> fetch +
ancestry + checkout + config (geofm.watcher.checkout) -> Snakemake (geofm.watcher.runner)
-> publish (geofm.watcher.publish) -> final status.

Outcomes: the experiment's own problems end as `failed` (a refusal, a failed run); `cancelled`
when CI asked; infrastructure errors (git, S3, JWKS, DVC remote unreachable) and shutdowns put
the submission back in the queue with backoff; results whose push failed stay on this
watcher's disk (never pruned) and their push is retried when the queue comes round again.
A fenced holder (lease lost, or not renewable) writes nothing more.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from geofm import names
from geofm.config import MAX_CONFIG_BYTES, write_json
from geofm.layout import ResultsLayout
from geofm.retry import Transient
from geofm.store import Malformed, TooLarge, Unavailable, now, parse_json, scrub
from geofm.watcher.checkout import SubmissionError, effective_config, make_checkout
from geofm.watcher.lease import Keeper, Lease
from geofm.watcher.status import TERMINAL, Status
from geofm.watcher.token import TokenError

if TYPE_CHECKING:
    from geofm.watcher.loop import Watcher

SUMMARY_KEYS = ("task", "model", "seed", "status", "headline_metric", "headline", "baseline", "beats_baseline",
                "error", "metrics")  # fmt: skip


class Fenced(Exception):
    """This watcher no longer holds the lease: it must write nothing more."""


class Requeue(Exception):
    """Back to the queue (infrastructure error or shutdown), with this message."""


def read_inside(root: Path, rel: str | Path, max_bytes: int) -> bytes | None:
    """A file the run wrote, only if it really lies inside `root` (no symbolic link out)."""
    path = root / rel
    try:
        real = path.resolve(strict=True)
        if not real.is_relative_to(root.resolve()):
            return None
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes)


class Job:
    def __init__(self, w: Watcher, sid: str, lease: Lease):
        self.w, self.sid, self.lease = w, sid, lease
        self.store, self.log = w.store, w.log
        self.run_dir = w.s.home / "runs" / sid
        self.status = Status(sid)
        self.keeper: Keeper | None = None
        self.cancelled = False
        self.lock = threading.RLock()
        self.finalised = False

    # status -------------------------------------------------------------------------------
    def write(self, state: str | None = None, *, final: bool = False, save: bool = True, **fields) -> None:
        """Change the status and write it. Changed, serialised and written under one lock (the
        lease keeper's thread writes progress), so writes land in order, and nothing overwrites
        a final (terminal or requeued) status."""
        with self.lock:
            if self.finalised:
                return
            if state:
                self.status.set_state(state, **fields)
            else:
                self.status.update(**fields)
            if not save:
                return
            body = scrub(self.status.to_bytes().decode(), self.w.secrets).encode()
            self.w.s3(lambda: self.store.put(self.store.status_key(self.sid), body), "writing the status")
            self.finalised = final

    def _load_status(self) -> Status:
        key = self.store.status_key(self.sid)
        try:
            found = self.w.s3(lambda: self.store.get(key), "reading the status")
            return Status.parse(found[0], self.sid)
        except KeyError:
            return Status(self.sid)
        except (Malformed, TooLarge) as e:
            body, reason = (None if isinstance(e, TooLarge) else found[0]), str(e)
            self.log(f"quarantined the status of {self.sid}: {reason}")
            self.w.s3(lambda: self.store.quarantine(self.sid, "status.json", reason, body, self.w.s.name), "quarantine")
            return Status(self.sid, message=f"previous status quarantined: {reason}")

    def _state(self) -> dict:
        try:
            return json.loads((self.run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    # the whole of it ------------------------------------------------------------------------
    def handle(self) -> None:
        self.status = self._load_status()
        if self.status.state in TERMINAL:  # finished before a crash could clean up
            return self._dequeue()
        pending = (self.run_dir / "pending.json").exists()
        if self.status.pending_publish and not pending and self.status.watcher != self.w.ident:
            self.log(f"{self.sid}: its results wait on {self.status.watcher} to be pushed; leaving it there")
            self.w.later(self.sid)
            return self.w.leases.release(self.lease)
        try:
            meta, config = self._read_submission()
            claims = self._verify(meta)
        except SubmissionError as e:
            return self._finish("failed", f"refused: {e}")
        self.write("running", attempt=self.status.attempt + 1, watcher=self.w.ident, started_at=now(),
                   commit=meta["commit"], branch=meta["branch"], message="preparing the checkout",
                   submitted_by=claims.get("user_login"), pipeline_url=meta.get("pipeline_url"),
                   submitted_at=meta.get("submitted_at"))  # fmt: skip
        self.log(f"running {self.sid} (attempt {self.status.attempt})")
        self.keeper = Keeper(self.w.leases, self.lease, self._on_fence, self._tick, self.w.s.poll_s)
        self.keeper.start()
        try:
            if pending:
                self._publish_pending()
            else:
                self._run(meta, config)
        except SubmissionError as e:
            self._finish("failed", str(e), **self._report())
        except Fenced as e:
            self.log(f"{self.sid}: {e}; leaving it to the lease holder")
        except (Requeue, Transient) as e:
            self._requeue(str(e))
        finally:
            self.keeper.stop()

    def _read_submission(self) -> tuple[dict, bytes]:
        def get(name: str, limit: int) -> bytes:
            try:
                return self.w.s3(lambda: self.store.get(self.store.key(self.sid, name), limit)[0], f"reading {name}")
            except KeyError:
                raise SubmissionError(f"{name} is missing") from None
            except TooLarge as e:
                self._quarantine(name, str(e), None)

        raw = get("submission.json", 64 * 1024)
        config = get("config.yaml", MAX_CONFIG_BYTES)
        try:
            meta = parse_json(raw, "submission.json")
        except Malformed as e:
            self._quarantine("submission.json", str(e), raw)
        for key, ok in (("commit", names.valid(names.COMMIT, meta.get("commit"))),
                        ("branch", names.valid(names.SAFE_BRANCH, meta.get("branch"))),
                        ("config_path", names.config_path(meta.get("config_path"))),
                        ("id_token", isinstance(meta.get("id_token"), str))):  # fmt: skip
            if not ok:
                self._quarantine(
                    "submission.json", f"submission.json: {key} {names.short(meta.get(key))} is not valid", raw
                )
        return meta, config

    def _quarantine(self, name: str, reason: str, body: bytes | None):
        self.log(f"quarantined {name} of {self.sid}: {reason}")
        self.w.s3(lambda: self.store.quarantine(self.sid, name, reason, body, self.w.s.name), "quarantine")
        raise SubmissionError(f"quarantined: {reason}")

    def _verify(self, meta: dict) -> dict:
        # Judged at upload time (the store's clock): the token was valid when CI presented it,
        # however long the submission then waited in the queue.
        uploaded = self.w.s3(lambda: self.store.modified(self.store.key(self.sid, "submission.json")), "reading it")
        try:
            return self.w.verifier.verify(meta["id_token"], commit=meta["commit"], branch=meta["branch"], at=uploaded)
        except TokenError as e:
            raise SubmissionError(str(e)) from None

    # lease keeper callbacks -----------------------------------------------------------------
    def _on_fence(self, reason: str) -> None:
        self.w.runner.stop("fenced")

    def _tick(self) -> None:
        if not self.cancelled and self.store.exists(self.store.key(self.sid, "cancel")):
            self.log(f"{self.sid}: cancel marker found")
            self.cancelled = True
        progress = self.w.runner.progress
        if progress and progress != self.status.progress and self.w.runner.child is not None:
            self.write(progress=progress)

    def _should_stop(self) -> str | None:
        if self.keeper and self.keeper.check_overdue():
            return "fenced"
        if self.cancelled:
            return "cancelled"
        return "shutdown" if self.w.stop.is_set() else None

    # run ------------------------------------------------------------------------------------
    def _prepare(self, meta: dict, config: bytes) -> dict:
        commit, branch = meta["commit"], meta["branch"]
        mirror = self.w.mirror
        tip = mirror.fetch(branch)
        mirror.require_ancestor(commit, branch, tip)
        self.log(f"{self.sid}: {commit[:10]} is on {mirror.remote}/{branch} ({tip[:10]})")
        state, checkout = self._state(), self.run_dir / "checkout"
        if state.get("commit") != commit or not (checkout / ".git" / "HEAD").is_file():
            state = {
                "commit": commit,
                "branch": branch,
                "base": tip,
                "first_started": state.get("first_started", time.time()),
            }
        fresh = make_checkout(mirror, checkout, commit, branch, state["base"])
        merged, resolved = effective_config(
            mirror, checkout, sid=self.sid, commit=commit, branch=branch, config_path=meta["config_path"],
            uploaded=config, operator=self.w.s.operator,
        )  # fmt: skip
        layout = ResultsLayout(resolved["results_dir"], resolved["experiment"], resolved["scratch_dir"])
        # The experiment's own deadline (a `deadline_h` key, once the schema has one) within the operator's.
        own = resolved.get("deadline_h")
        limit = (
            min(self.w.s.deadline_s, own * 3600) if isinstance(own, int | float) and own > 0 else self.w.s.deadline_s
        )
        state.update(experiment=resolved["experiment"], exp_rel=layout.root, scratch=layout.scratch, deadline_s=limit)
        if fresh:  # results of an earlier run of this experiment checked out from git are not this run's
            from geofm.versioning import clean_experiment

            clean_experiment(checkout, Path(layout.root))
        write_json(merged, self.run_dir / "config.json")  # Snakemake never evaluates JSON
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=2))
        (self.run_dir / "home").mkdir(exist_ok=True)
        self.w.own_run_dir(self.run_dir)
        return state

    def _run(self, meta: dict, config: bytes) -> None:
        if self.cancelled or self.store.exists(self.store.key(self.sid, "cancel")):
            return self._finish("cancelled", "cancelled before it started")
        state = self._prepare(meta, config)
        self.write(experiment=state["experiment"], results_path=state["exp_rel"], save=False)
        checkout, runner = self.run_dir / "checkout", self.w.runner
        deadline = time.monotonic() + state["deadline_s"] - (time.time() - state["first_started"])
        runner.reap_orphan(self.run_dir)
        if any((checkout / ".snakemake" / "locks").glob("*")):
            runner.run(checkout, self.run_dir / "config.json", self.run_dir, ["--unlock"],
                       should_stop=self._should_stop, deadline=deadline)  # fmt: skip
        self.write(message="running snakemake", snakemake_started_at=now())
        self.log(f"{self.sid}: running snakemake in {checkout}")
        result = runner.run(checkout, self.run_dir / "config.json", self.run_dir, [], should_stop=self._should_stop,
                            deadline=deadline)  # fmt: skip
        receipts = Path(state["scratch"]) if Path(state["scratch"]).is_absolute() else checkout / state["scratch"]
        if result.stopped:
            return self._stopped(result.stopped, state)
        if result.rc == 0 and (receipts / "versioning" / "version.json").is_file():
            return self._publish(state, "succeeded", "all cells finished; results versioned")
        self.log(f"{self.sid}: snakemake exited with {result.rc}; versioning the evidence")
        self.write(message="run failed; versioning the evidence")
        message = f"snakemake exited with status {result.rc}"
        said = [line for line in result.tail if line.startswith("config error: ")]
        if said:  # the workflow rejected the config before planning (e.g. a dataset layout)
            message = said[-1]
        (receipts / "versioning" / "evidence.json").unlink(missing_ok=True)
        evidence = runner.run(checkout, self.run_dir / "config.json", self.run_dir, ["version_evidence", "--force"],
                              should_stop=self._should_stop, deadline=deadline)  # fmt: skip
        if evidence.stopped:
            return self._stopped(evidence.stopped, state)
        tail = result.tail
        if evidence.rc != 0:
            tail = tail + ["--- version_evidence ---"] + evidence.tail
            return self._finish("failed", message + "; versioning the evidence failed too (see log_tail)",
                                **self._report(tail))  # fmt: skip
        return self._publish(state, "failed", message, tail)

    def _stopped(self, why: str, state: dict) -> None:
        if why == "fenced":
            self._check_lease()
            raise Requeue(f"stopped: {self.keeper.reason}; resumes when the queue comes round")
        if why == "shutdown":
            raise Requeue("interrupted by a watcher shutdown; resumes on restart")
        if why == "cancelled":
            return self._finish("cancelled", "cancelled from CI; the run was stopped", **self._report())
        limit = state["deadline_s"]
        when = f"{limit / 3600:g} h" if limit >= 3600 else f"{limit:g} s"
        return self._finish("failed", f"deadline of {when} reached; the run was stopped", **self._report())

    # publish ---------------------------------------------------------------------------------
    def _publish(self, state: dict, outcome: str, message: str, tail: list[str] | None = None) -> None:
        pending = {"outcome": outcome, "message": message, "tail": (tail or [])[-40:]}
        (self.run_dir / "pending.json").write_text(json.dumps(pending))
        self._publish_pending()

    def _publish_pending(self) -> None:
        pending, state = json.loads((self.run_dir / "pending.json").read_text()), self._state()
        p, checkout = self.w.publisher, self.run_dir / "checkout"
        self.write(experiment=state["experiment"], results_path=state["exp_rel"], message="pushing the results")
        commit = p.fetch(checkout, self.sid)
        p.check(commit, state["base"], state["exp_rel"], state["experiment"], self.sid)
        self.log(f"{self.sid}: results commit {commit[:10]} checked; pushing it and its DVC objects")
        self._check_lease()  # the token again, before anything is pushed
        try:
            n = p.push_dvc(commit, state["exp_rel"], checkout, self.run_dir / "dvc-staging")
            pushed = p.push_git(commit, state["base"], state["branch"], state["exp_rel"], self.sid, self._guard)
        except Transient as e:
            self.write(pending_publish=True, save=False)
            raise Requeue(f"results prepared; pushing them failed ({e}); retried when the queue comes round") from None
        self.log(f"{self.sid}: pushed {n} DVC objects and {pushed[:10]} to {self.w.mirror.remote}/{state['branch']}")
        report = self._report(pending["tail"], pushed)
        self._finish(pending["outcome"], pending["message"], pending_publish=False, **report)
        (self.run_dir / "pending.json").unlink(missing_ok=True)

    def _report(self, tail: list[str] | None = None, results_commit: str | None = None) -> dict:
        """Summary rows and error excerpts from the run's files (read without following links out)."""
        state = self._state()
        checkout = self.run_dir / "checkout"
        report: dict = {"results_commit": results_commit, "summary": [], "errors": []}
        if "exp_rel" not in state:
            return report
        layout = ResultsLayout.of(state["exp_rel"])
        try:
            rows = json.loads(read_inside(checkout, layout.table("summary.json"), 1 << 20) or b"{}").get("rows", [])
            report["summary"] = [{k: row.get(k) for k in SUMMARY_KEYS} for row in rows[:1000] if isinstance(row, dict)]
        except (ValueError, AttributeError):
            pass
        for err in sorted((checkout / layout.err).glob("*.err"))[:20]:
            text = (read_inside(checkout, err.relative_to(checkout), 200_000) or b"").decode(errors="replace")
            head, _, rest = text.partition("\n--- traceback ---\n")
            trace = rest.split("\n--- last ")[0].strip().splitlines()[-8:]
            excerpt = head.strip() + ("\n--- traceback (last lines) ---\n" + "\n".join(trace) if trace else "")
            report["errors"].append({"file": str(err.relative_to(checkout)), "excerpt": excerpt[-3000:]})
        if tail:
            report["log_tail"] = "\n".join(tail[-40:])
        return report

    # endings --------------------------------------------------------------------------------
    def _guard(self) -> None:
        if self.keeper is not None and self.keeper.fenced.is_set():
            raise Fenced(f"fenced ({self.keeper.reason})")
        self._check_lease()

    def _check_lease(self) -> None:
        if not self.w.s3(lambda: self.w.leases.holds(self.lease), "checking the lease"):
            raise Fenced("another watcher holds the lease now")

    def _finish(self, state: str, message: str, **fields) -> None:
        if self.keeper is not None:
            self._check_lease()  # the token again, before the final status
        self.write(state, final=True, message=message, finished_at=now(), progress=None, **fields)
        self._dequeue()
        (self.w.s.home / "finished").mkdir(parents=True, exist_ok=True)
        (self.w.s.home / "finished" / self.sid).touch()
        self.log(f"{self.sid} {state}: {message}")
        self.w.prune()

    def _dequeue(self) -> None:
        self.w.s3(lambda: self.store.delete(self.store.queue_key(self.sid)), "dequeuing")
        self.w.leases.release(self.lease)

    def _requeue(self, message: str) -> None:
        if self.w.stop.is_set() and "shutdown" not in message:
            message = f"interrupted by a watcher shutdown ({message}); resumes on restart"
        self.log(f"{self.sid} back to the queue: {message}")
        try:
            self._check_lease()
        except Fenced:
            return
        except Unavailable:
            self.log(f"{self.sid}: object store unreachable; its lease expires by itself")
            return
        try:
            self.write("queued", final=True, message=message, progress=None)
            self.w.leases.release(self.lease)
        except Unavailable:
            self.log(f"{self.sid}: object store unreachable; its lease expires by itself")
        self.w.later(self.sid)
