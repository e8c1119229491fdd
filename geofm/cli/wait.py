"""geofm-wait (CI wait stage): follow a submission until the watcher finishes it, fetch the
results and judge them.

    geofm-wait "$SUBMISSION_ID" --timeout 86400 --poll 30 --fetch geofm-results
    geofm-wait --cancel "$SUBMISSION_ID"      # after_script of a cancelled job

Trusts nothing it reads: every status field is validated (geofm.watcher.status), the status
must name the submission, commit and branch this job submitted, the results path must be
relative and inside the checkout, and the branch used for fetching is this job's own
(CI_COMMIT_BRANCH), never a value from the status. The verdict comes from the fetched
results: the results commit must sit on the branch above the submitted commit, and every
row of its summary.json must be ok. SIGTERM (GitLab cancelling the job) writes the cancel
marker, so the watcher stops the run.

Exit status: 0 when the experiment succeeded and its fetched results say so, 1 otherwise,
2 when --timeout passed first, 3 when the results could not be fetched.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

from geofm import names
from geofm.layout import ResultsLayout
from geofm.store import DEFAULT_PREFIX, Malformed, Store, TooLarge, Unavailable, now, scrub
from geofm.versioning import git_env
from geofm.watcher.status import TERMINAL, Status

DVC = str(Path(sys.executable).parent / "dvc")
TABLE = ["task", "model", "seed", "status", "headline_metric", "headline", "baseline", "beats_baseline",
         "metric_1", "value_1", "metric_2", "value_2", "metric_3", "value_3", "error"]  # fmt: skip


def say(message: str = "") -> None:
    print(scrub(message), flush=True)


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)[:60]

    columns = [c for c in columns if any(cell(r.get(c)) for r in rows)]
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def read_status(store: Store, sid: str) -> Status | None:
    try:
        return Status.parse(store.get(store.status_key(sid))[0], sid)
    except KeyError:
        return None


def problem(status: Status, commit: str, branch: str) -> str | None:
    """Why this status cannot be about what this job submitted (None if it can)."""
    for key, ours in (("commit", commit), ("branch", branch)):
        theirs = getattr(status, key)
        if theirs is not None and theirs != ours:
            return f"status.{key} {names.short(theirs)} is not the submitted {ours!r}"
    if status.state == "succeeded":
        if status.commit is None or status.branch is None or status.results_commit is None:
            return "a succeeded status without commit, branch and results commit"
        if status.results_path is None or PurePosixPath(status.results_path).name != status.experiment:
            return f"status.results_path {names.short(status.results_path)} is not <results_dir>/<experiment>"
    return None


def follow(store: Store, sid: str, commit: str, branch: str, timeout: float, poll: float) -> Status | str | None:
    """The terminal status, a reason to distrust it (str), or None on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    last_state, last_progress, last_note = None, None, start
    while time.monotonic() < deadline:
        try:
            status = read_status(store, sid)
        except Unavailable as e:
            say(f"[{stamp()}] object store unavailable ({e}); still waiting")
            status = None
        except (Malformed, TooLarge) as e:
            return f"the status object is not valid: {e}"
        if status is None and last_state is None:
            say(f"[{stamp()}] queued: waiting for a watcher")
            last_state = "waiting"
        if status:
            bad = problem(status, commit, branch)
            if bad:
                return bad
            elapsed = int(time.monotonic() - start)
            if status.state != last_state:
                who = f" on {status.watcher}" if status.watcher and status.state == "running" else ""
                say(f"[{stamp()}] {status.state}{who}" + (f": {status.message}" if status.message else ""))
                last_state, last_note = status.state, time.monotonic()
            elif status.progress and status.progress != last_progress:
                say(f"[{stamp()}] running: {status.progress} (after {elapsed // 60} min {elapsed % 60} s)")
                last_note = time.monotonic()
            elif time.monotonic() - last_note > 300:
                say(f"[{stamp()}] still {status.state} after {elapsed // 60} min")
                last_note = time.monotonic()
            last_progress = status.progress
            if status.state in TERMINAL:
                return status
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    return None


def report_status(status: Status) -> None:
    say("")
    say(f"experiment {status.experiment!r} {status.state}: {status.message}")
    for key in ("commit", "branch", "watcher", "submitted_by", "attempt", "submitted_at", "snakemake_started_at",
                "finished_at", "results_commit"):  # fmt: skip
        if getattr(status, key):
            say(f"  {key}: {getattr(status, key)}")
    if status.summary:
        say("\nsummary (from the status object):")
        say(table(status.summary, ["task", "model", "seed", "status", "headline_metric", "headline", "baseline"]))
    for err in status.errors:
        say(f"\n--- {err.get('file')} (excerpt) ---\n{err.get('excerpt')}")
    if status.log_tail:
        say("\n--- last lines of the watcher's snakemake log ---\n" + status.log_tail)


def run(*cmd: str, cwd: Path, quiet: bool = False) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=3600, env=git_env())
    out = (result.stderr if quiet else result.stdout + result.stderr).strip()
    if out:
        say(out[-3000:])
    return result


def fetch(status: Status, branch: str, commit: str, dest: Path) -> Path | None:
    """The results commit checked out in `dest` (a worktree), its DVC files pulled; None when
    it cannot be fetched or is not on this job's branch above the submitted commit."""
    results, repo = status.results_commit, Path.cwd()
    say(f"\nfetching results commit {results[:10]} (git + dvc pull) into {dest}/")
    if run("git", "fetch", "--quiet", "origin", f"refs/heads/{branch}", cwd=repo).returncode != 0:
        return None
    for older, newer in ((results, "FETCH_HEAD"), (commit, results)):
        if run("git", "merge-base", "--is-ancestor", older, newer, cwd=repo).returncode != 0:
            say(f"results commit {results[:10]} is not on origin/{branch} above the submitted commit")
            return None
    if dest.exists():
        run("git", "worktree", "remove", "--force", str(dest), cwd=repo)
        shutil.rmtree(dest, ignore_errors=True)
    run("git", "worktree", "prune", cwd=repo)
    if run("git", "worktree", "add", "--quiet", "--detach", str(dest), results, cwd=repo).returncode != 0:
        return None
    listed = run("git", "ls-files", "-z", "--", status.results_path, cwd=dest, quiet=True).stdout.split("\0")
    dvc_files = [f for f in listed if f.endswith(".dvc")]
    if dvc_files and run(DVC, "pull", "--quiet", *dvc_files, cwd=dest).returncode != 0:
        return None
    return dest / status.results_path


def verdict(exp: Path) -> str | None:
    """Why the fetched results are not a success (None when every cell is ok)."""
    try:
        rows = json.loads(Path(ResultsLayout.of(exp).table("summary.json")).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the fetched results hold no readable out/summary.json"
    if not isinstance(rows, list) or not rows:
        return "the fetched summary.json has no cells"
    failed = [r for r in rows if not isinstance(r, dict) or r.get("status") != "ok"]
    return f"{len(failed)} of {len(rows)} cells are not ok in the fetched summary.json" if failed else None


def report_files(exp: Path) -> None:
    layout = ResultsLayout.of(exp)
    summary = Path(layout.table("summary.csv"))
    if summary.is_file():
        with open(summary) as f:
            say(f"\n{summary.relative_to(exp.parent.parent)}:\n{table(list(csv.DictReader(f)), TABLE)}")
    for task, model, seed in layout.finished_cells():
        metrics = Path(layout.cell_file("metrics.json", task, model, seed))
        pinned = json.loads(metrics.read_text()).get("pinned", {})
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pinned.items())
        say(f"metrics {layout.cell(task, model, seed)}: {values}")
    for err in layout.err_files():
        lines = err.read_text(errors="replace").splitlines()
        say(f"\n--- {err.relative_to(exp.parent.parent)} ---")
        say("\n".join(lines[:80]) + ("\n[...]" if len(lines) > 80 else ""))


def cancel(store: Store, sid: str, why: str) -> None:
    doc = {"at": now(), "why": why, "job": os.environ.get("CI_JOB_URL", "")}
    store.put_json(store.key(sid, "cancel"), doc)
    say(f"asked the watcher to stop {sid} ({why})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geofm-wait", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("submission", help="submission id (SUBMISSION_ID from the submit job)")
    p.add_argument("--timeout", type=float, default=86400, help="seconds to wait at most (default: 86400)")
    p.add_argument("--poll", type=float, default=30, help="seconds between looks at the status (default: 30)")
    p.add_argument("--fetch", type=Path, help="check the results out here, dvc pull them and judge them")
    p.add_argument("--commit", default=os.environ.get("CI_COMMIT_SHA"), help="the submitted commit (CI_COMMIT_SHA)")
    p.add_argument("--branch", default=os.environ.get("CI_COMMIT_BRANCH"), help="the branch (CI_COMMIT_BRANCH)")
    p.add_argument("--cancel", action="store_true", help="ask the watcher to stop this submission, then exit")
    a = p.parse_args(argv)
    env = os.environ
    if not names.valid(names.SUBMISSION_ID, a.submission):
        return print(f"wait: {names.short(a.submission)} is not a submission id", file=sys.stderr) or 1
    store = Store(env["S3_BUCKET"], env.get("S3_PREFIX") or DEFAULT_PREFIX, env.get("S3_ENDPOINT_URL"))
    if a.cancel:
        cancel(store, a.submission, "the CI job was cancelled")
        return 0
    if not names.valid(names.COMMIT, a.commit) or not names.valid(names.SAFE_BRANCH, a.branch):
        return print("wait: --commit/--branch (CI_COMMIT_SHA/CI_COMMIT_BRANCH) are not set", file=sys.stderr) or 1

    def on_signal(signum, _frame):
        try:
            cancel(store, a.submission, f"the CI job received {signal.Signals(signum).name}")
        finally:
            os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    say(f"waiting for submission {a.submission} (at most {a.timeout:.0f} s, polling every {a.poll:g} s)")
    status = follow(store, a.submission, a.commit, a.branch, a.timeout, a.poll)
    if status is None:
        say(f"timed out after {a.timeout:.0f} s; the experiment may still be running (see the status object)")
        return 2
    if isinstance(status, str):
        say(f"refusing the status of {a.submission}: {status}")
        return 1
    report_status(status)
    code = 0 if status.state == "succeeded" else 1
    if a.fetch and status.results_commit:
        exp = fetch(status, a.branch, a.commit, a.fetch if a.fetch.is_absolute() else Path.cwd() / a.fetch)
        if exp is None:
            say("the results could not be fetched")
            return 3 if code == 0 else code
        report_files(exp)
        why = verdict(exp)
        if code == 0 and why:
            say(f"\nthe status says succeeded, but {why}")
            code = 1
    elif code == 0:
        say("\nnot checked against the fetched results (no --fetch or no results commit)")
        code = 0 if a.fetch is None else 3
    say(f"\nexperiment {status.state}; exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
