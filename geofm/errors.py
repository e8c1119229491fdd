"""Error files: err/<task>_<model>_seed<N>.err, the evidence a failed cell leaves behind.

Each holds the stage, the exception, the last lines of the job's log, the log's path and,
on a cluster, the scheduler's job id and log. A cell's error file is removed when the
stage that wrote it succeeds on a re-run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import sys
import traceback
from pathlib import Path

TAIL_LINES = 40


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(log not readable)\n"


def scheduler_log() -> str | None:
    """Where the scheduler keeps this job's own log, if the job runs under one."""
    if os.environ.get("SNAKEMAKE_SLURM_LOG"):
        return os.environ["SNAKEMAKE_SLURM_LOG"]
    if os.environ.get("LSB_JOBID"):
        return os.environ.get("LSB_OUTPUTFILE") or f"LSF job {os.environ['LSB_JOBID']} (bjobs -l / bhist -l)"
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {os.environ['SLURM_JOB_ID']} (sacct -j {os.environ['SLURM_JOB_ID']})"
    return None


def write(err_path: Path, *, stage: str, cell: str, cause: str, log_path: Path | None, details: str = "") -> None:
    err_path = Path(err_path)
    err_path.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [
        f"cell: {cell}",
        f"stage: {stage}",
        f"time: {now}",
        f"host: {platform.node()}",
        f"cause: {cause}",
        f"log: {log_path}" if log_path else "log: (none)",
    ]
    sched = scheduler_log()
    if sched:
        lines.append(f"scheduler log: {sched}")
    text = "\n".join(lines) + "\n"
    if details:
        text += "\n--- traceback ---\n" + details.rstrip() + "\n"
    if log_path:
        text += f"\n--- last {TAIL_LINES} lines of {log_path} ---\n" + tail(Path(log_path))
    err_path.write_text(text)


@contextlib.contextmanager
def captured(log_path: Path, err_path: Path | None = None, *, stage: str = "", cell: str = ""):
    """Run a job body with its stdout and stderr in its log file; on an exception write the
    error file (if the job has one), then fail the job.

    Redirection works on file descriptors, so native libraries' messages land in the log too.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield
    except BaseException as e:
        traceback.print_exc()
        log.flush()
        if err_path is not None:
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            cause = f"{type(e).__name__}: {message}"
            if isinstance(e, SystemExit):  # argument parsers print the reason, then exit
                said = [line for line in tail(log_path, 200).splitlines() if line.startswith("error:")]
                cause = f"config rejected by TerraTorch's CLI: {said[-1][len('error: ') :] if said else message}"
            write(err_path, stage=stage, cell=cell, cause=cause, log_path=log_path, details=traceback.format_exc())
        raise
    else:
        stale = Path(err_path) if err_path is not None else None
        if stale and stale.is_file() and f"stage: {stage}\n" in stale.read_text(errors="replace"):
            stale.unlink()
