#!/usr/bin/env python3
"""CI helper (wait stage): follow a submission until the watcher finishes it, fetch the results.

    python scripts/wait.py "$SUBMISSION_ID" --timeout 86400 --poll 30 --fetch geofm-results

Prints every state change and the run's progress, then the summary and any error excerpts
from the status object. With --fetch it checks the results commit out into its own worktree
(git) and pulls the experiment's DVC files there (`dvc pull`), then prints the summary table,
each cell's metrics and the error files from those fetched files.

Exit status: 0 when the experiment succeeded (and its results could be fetched), 1 when it
failed, 2 when --timeout passed first, 3 when the results could not be fetched.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geofm import cos  # noqa: E402
from geofm.versioning import COMMIT, git_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).parent / "dvc")
TABLE = ["task", "model", "seed", "status", "headline_metric", "headline", "baseline", "beats_baseline",
         "metric_1", "value_1", "metric_2", "value_2", "metric_3", "value_3", "error"]  # fmt: skip


def say(message: str = "") -> None:
    print(cos.scrub(message), flush=True)


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


def follow(store: cos.Store, sid: str, timeout: float, poll: float) -> dict | None:
    start = time.monotonic()
    deadline = start + timeout
    last_state, last_progress, last_note = None, None, start
    while time.monotonic() < deadline:
        try:
            status = store.status(sid)
        except cos.Unavailable as e:
            say(f"[{stamp()}] object store unavailable ({e}); still waiting")
            status = None
        if status:
            state = status.get("state")
            progress = status.get("progress")
            elapsed = int(time.monotonic() - start)
            if state != last_state:
                who = f" on {status['watcher']}" if status.get("watcher") and state == "running" else ""
                note = status.get("message") or ""
                say(f"[{stamp()}] {state}{who}" + (f": {note}" if note else ""))
                last_state, last_note = state, time.monotonic()
            elif progress and progress != last_progress:
                say(f"[{stamp()}] running: {progress} (after {elapsed // 60} min {elapsed % 60} s)")
                last_note = time.monotonic()
            elif time.monotonic() - last_note > 300:
                say(f"[{stamp()}] still {state} after {elapsed // 60} min")
                last_note = time.monotonic()
            last_progress = progress
            if state in cos.TERMINAL:
                return status
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    return None


def report_status(status: dict) -> None:
    say("")
    say(f"experiment {status.get('experiment')!r} {status.get('state')}: {status.get('message', '')}")
    for key in ("commit", "branch", "watcher", "attempt", "submitted_at", "snakemake_started_at", "finished_at",
                "results_commit"):  # fmt: skip
        if status.get(key) is not None:
            say(f"  {key}: {status[key]}")
    if status.get("summary"):
        say("\nsummary (from the status object):")
        say(table(status["summary"], ["task", "model", "seed", "status", "headline_metric", "headline", "baseline"]))
    for err in status.get("errors", []):
        say(f"\n--- {err['file']} (excerpt) ---\n{err['excerpt']}")
    if status.get("log_tail"):
        say("\n--- last lines of the watcher's snakemake log ---\n" + status["log_tail"])


def run(*cmd: str, cwd: Path, quiet: bool = False) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=3600, env=git_env())
    out = (result.stderr if quiet else result.stdout + result.stderr).strip()
    if out:
        say(out[-3000:])
    return result


def fetch(status: dict, dest: Path) -> Path | None:
    """Check out the results commit in `dest` (a worktree) and dvc pull the experiment there."""
    commit, branch = status.get("results_commit") or "", status.get("branch") or ""
    if not COMMIT.match(commit):
        say("no results commit to fetch")
        return None
    say(f"\nfetching results commit {commit[:10]} (git + dvc pull) into {dest}/")
    run("git", "fetch", "--quiet", "origin", f"refs/heads/{branch}", cwd=REPO)
    if run("git", "cat-file", "-e", f"{commit}^{{commit}}", cwd=REPO).returncode != 0:
        run("git", "fetch", "--quiet", "origin", commit, cwd=REPO)
    if dest.exists():
        run("git", "worktree", "remove", "--force", str(dest), cwd=REPO)
        shutil.rmtree(dest, ignore_errors=True)
    run("git", "worktree", "prune", cwd=REPO)
    if run("git", "worktree", "add", "--quiet", "--detach", str(dest), commit, cwd=REPO).returncode != 0:
        return None
    exp = status.get("results_path") or ""
    listed = run("git", "ls-files", "--", exp, cwd=dest, quiet=True).stdout.split()
    dvc_files = [f for f in listed if f.endswith(".dvc")]
    if dvc_files and run(DVC, "pull", "--quiet", *dvc_files, cwd=dest).returncode != 0:
        return None
    return dest / exp


def report_files(exp: Path) -> None:
    summary = exp / "out" / "summary.csv"
    if summary.is_file():
        rows = list(csv.DictReader(open(summary)))
        say(f"\n{summary.relative_to(exp.parent.parent)}:")
        say(table(rows, TABLE))
    for metrics in sorted((exp / "out").glob("*/*/seed*/metrics.json")):
        pinned = json.loads(metrics.read_text()).get("pinned", {})
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pinned.items())
        say(f"metrics {metrics.parent.relative_to(exp / 'out')}: {values}")
    for err in sorted((exp / "err").glob("*.err")):
        lines = err.read_text(errors="replace").splitlines()
        say(f"\n--- {err.relative_to(exp.parent.parent)} ---")
        say("\n".join(lines[:80]) + ("\n[...]" if len(lines) > 80 else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", help="submission id (SUBMISSION_ID from the submit job)")
    p.add_argument("--timeout", type=float, default=86400, help="seconds to wait at most (default: 86400)")
    p.add_argument("--poll", type=float, default=30, help="seconds between looks at the status (default: 30)")
    p.add_argument("--fetch", type=Path, help="check the results out here and dvc pull them")
    a = p.parse_args(argv)
    env = os.environ
    if not cos.SUBMISSION_ID.match(a.submission):
        print(f"wait: {a.submission!r} is not a submission id", file=sys.stderr)
        return 1
    store = cos.Store(env["S3_BUCKET"], env.get("S3_PREFIX") or cos.DEFAULT_PREFIX, env.get("S3_ENDPOINT_URL"))
    say(f"waiting for submission {a.submission} (at most {a.timeout:.0f} s, polling every {a.poll:g} s)")
    status = follow(store, a.submission, a.timeout, a.poll)
    if status is None:
        say(f"timed out after {a.timeout:.0f} s; the experiment may still be running (see the status object)")
        return 2
    report_status(status)
    code = 0 if status.get("state") == "succeeded" else 1
    if a.fetch:
        exp = fetch(status, a.fetch if a.fetch.is_absolute() else REPO / a.fetch)
        if exp is None:
            say("the results could not be fetched")
            return 3 if code == 0 else code
        report_files(exp)
    say(f"\nexperiment {status.get('state')}; exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
