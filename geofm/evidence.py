"""Error files: err/<task>_<model>_seed<N>.err, the evidence a failed cell leaves behind.

This module is the one way a failed job reaches err/ (at the paths geofm.layout gives): a job
that raises writes its own file as it fails (`captured`, around every rule script), and a job
the scheduler killed before it could (memory or time limit, scancel) gets its file from the
workflow's onerror handler, which reads the job's scheduler log (`write_killed_cells`). Both
write through `write`. Each holds the stage, the exception, the last lines of the job's log, the log's path and,
on a cluster, the scheduler's job id and log. A cell's error file is removed when the
stage that wrote it succeeds on a re-run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

TAIL_LINES = 40
# Where the executor plugins write each job's scheduler log (relative to the working directory).
SLURM_LOGS = Path(".snakemake/slurm_logs")
LSF_LOGS = Path(".snakemake/lsf_logs")


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(log not readable)\n"


def scheduler_log() -> str | None:
    """Where the scheduler keeps this job's own log, if the job runs under one: '<path> (<job>)'.

    LSF names the `bsub -o` file in LSB_OUTPUTFILE. The SLURM plugin writes
    .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log under the working directory (where
    the job runs) unless --slurm-logdir moves it; then SLURM itself is asked (`scontrol show job`).
    """
    lsf_job = os.environ.get("LSB_JOBID")
    if lsf_job:
        out = os.environ.get("LSB_OUTPUTFILE")
        return f"{out} (LSF job {lsf_job})" if out else f"LSF job {lsf_job} (bjobs -l {lsf_job}; bhist -l {lsf_job})"
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        path = _slurm_log(slurm_job)
        return f"{path} (SLURM job {slurm_job})" if path else f"SLURM job {slurm_job} (sacct -j {slurm_job})"
    return None


def _slurm_log(job_id: str) -> str | None:
    array = f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    found = sorted(SLURM_LOGS.glob(f"rule_*/**/{job_id}.log")) + sorted(SLURM_LOGS.glob(f"rule_*/{array}.log"))
    if found:
        return str(found[0].resolve())
    said = _ask("scontrol", "show", "job", "-o", job_id)
    path = next((f[len("StdOut=") :] for f in (said or "").split() if f.startswith("StdOut=")), None)
    return path if path and "%" not in path else None


def _ask(*cmd: str) -> str | None:
    """stdout of a scheduler command, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def write(
    err_path: Path,
    *,
    stage: str,
    cell: str,
    cause: str,
    log_path: Path | None,
    details: str = "",
    scheduler: tuple[Path, str] | None = None,
) -> None:
    """`scheduler`: (log, job) of a job that could not write this file itself (see write_killed)."""
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
    sched = f"{scheduler[0]} ({scheduler[1]})" if scheduler else scheduler_log()
    if sched:
        lines.append(f"scheduler log: {sched}")
    text = "\n".join(lines) + "\n"
    if details:
        text += "\n--- traceback ---\n" + details.rstrip() + "\n"
    if log_path:
        text += f"\n--- last {TAIL_LINES} lines of {log_path} ---\n" + tail(Path(log_path))
    if scheduler:
        text += f"\n--- last {TAIL_LINES} lines of {scheduler[0]} ---\n" + tail(Path(scheduler[0]))
    err_path.write_text(text)


def _cause(error: BaseException) -> str:
    """'<type>: <first line>', or for an error re-raised from a data loader worker (whose message
    starts 'Caught X in DataLoader worker process N.') the original error's own last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].strip()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def captured(log_path: Path, err_paths: Path | list | None = None, *, stage: str = "", cell: str = ""):
    """Run a job body with its stdout and stderr in its log file; on an exception write the
    error file(s) (a preflight fails every seed of its task x model), then fail the job.

    Redirection works on file descriptors, so native libraries' messages land in the log too.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if err_paths is None:
        err_paths = []
    elif isinstance(err_paths, (str, Path)):
        err_paths = [err_paths]
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield
    except BaseException as e:
        traceback.print_exc()
        log.flush()
        cause = _cause(e)
        if isinstance(e, SystemExit):  # argument parsers print the reason, then exit
            said = [line for line in tail(log_path, 200).splitlines() if line.startswith("error:")]
            cause = f"config rejected by TerraTorch's CLI: {said[-1][len('error: ') :] if said else str(e)}"
        for err_path in err_paths:
            write(err_path, stage=stage, cell=cell, cause=cause, log_path=log_path, details=traceback.format_exc())
        raise
    else:
        for stale in map(Path, err_paths):
            if stale.is_file() and f"stage: {stage}\n" in stale.read_text(errors="replace"):
                stale.unlink()


# --- Jobs killed by the scheduler ------------------------------------------------------------
# A job killed for exceeding its memory or time limit, or cancelled, dies before its script can
# write its err/ file. The workflow's onerror handler writes it from the scheduler's log instead.

KILLED = [  # cause; SLURM's job state; what SLURM or LSF write in the job's log (checked in this order)
    ("out of memory", ("OUT_OF_MEMORY",), ("exceeded memory limit", "oom-kill", "oom_kill", "TERM_MEMLIMIT")),
    ("time limit reached", ("TIMEOUT",), ("DUE TO TIME LIMIT", "TERM_RUNLIMIT")),
    ("cancelled", ("CANCELLED",), ("CANCELLED AT", "TERM_OWNER", "TERM_ADMIN", "TERM_FORCE")),
]


def run_started(snakemake_log: str | Path | None) -> float:
    """Start of a run, from its log's name (.snakemake/log/<local time>.snakemake.log); 0 if unknown."""
    try:
        stamp = Path(snakemake_log).name.split(".snakemake.log")[0]
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H%M%S.%f").timestamp()
    except (TypeError, ValueError):
        return 0.0


def scheduler_logs(rule: str, wildcards: dict, since: float = 0.0) -> list[Path]:
    """A job's scheduler logs (SLURM or LSF plugin layout) written since `since`, newest last.

    A job submitted alone logs to rule_<rule>/<wildcards>/<jobid>.log; a task of a SLURM job
    array to rule_<rule>/<arrayjob>_<task>.log, found by the wildcards Snakemake prints in it."""
    folders = [
        SLURM_LOGS / f"rule_{rule}" / "_".join(str(v) for v in wildcards.values()),
        LSF_LOGS / f"rule_{rule}" / "..".join(f"{k}={v}" for k, v in wildcards.items()),
    ]
    logs = [log for folder in folders for log in folder.glob("*.log") if log.stat().st_mtime >= since]
    said = "wildcards: " + ", ".join(f"{k}={v}" for k, v in wildcards.items())
    for log in (SLURM_LOGS / f"rule_{rule}").glob("*_*.log"):
        if log.stat().st_mtime >= since and said in tail(log, 400):
            logs.append(log)
    return sorted(logs, key=lambda log: log.stat().st_mtime)


def write_killed(
    rule: str, wildcards: dict, *, done: Path, err_paths: list, cell: str, log_path: Path, since: float
) -> bool:
    """Write the err/ files of a job that ran under a scheduler in this run (it left a log), did
    not finish (`done` is missing) and wrote no err/ file itself. True if it wrote them."""
    if Path(done).exists() or any(Path(p).exists() for p in err_paths):
        return False
    logs = scheduler_logs(rule, wildcards, since)
    if not logs:
        return False
    log = logs[-1]
    text, job = tail(log, 200), f"LSF job, log {log.name}"
    state = ""
    if SLURM_LOGS in log.parents and log.stem.replace("_", "").isdigit():
        job = f"SLURM job {log.stem}"
        said = _ask("squeue", "-h", "-t", "all", "-j", log.stem, "-o", "%T")
        said = said or _ask("sacct", "-X", "-n", "-P", "-j", log.stem, "-o", "State")
        state = (said or "").strip().splitlines()[-1] if (said or "").strip() else ""
    why = next((c for c, states, says in KILLED if state.startswith(states) or any(s in text for s in says)), None)
    cause = f"killed by the scheduler: {why}" if why else "the job ended without its outputs or an error message"
    cause += f" ({job}{': ' + state if state else ''}); see its scheduler log"
    for err_path in err_paths:
        write(err_path, stage=rule, cell=cell, cause=cause, log_path=log_path, scheduler=(log.resolve(), job))
    return True


def write_killed_cells(layout, cells, *, since: float, search_workers: int = 0) -> list[str]:
    """write_killed for every heavy job of a run's cells (fine-tune and evaluate, and the search
    workers of each task x model, whose kill stops all its seeds), at the paths `layout`
    (geofm.layout.ResultsLayout) gives; returns the jobs whose err/ files it wrote."""
    written = []
    for task, model in dict.fromkeys((c.task, c.model) for c in cells):
        seeds = [c.seed for c in cells if (c.task, c.model) == (task, model)]
        for worker in range(search_workers):
            if write_killed(
                "hpo_worker",
                {"task": task, "model": model, "worker": worker},
                done=Path(layout.hpo_file(f"worker{worker}.json", task, model)),
                err_paths=[Path(layout.err_file(task, model, seed)) for seed in seeds],
                cell=f"{task}/{model} (search worker {worker})",
                log_path=Path(layout.log("hpo_worker", f"{task}_{model}_{worker}")),
                since=since,
            ):
                written.append(f"{task}/{model} (search worker {worker})")
    for c in cells:
        for rule, done in (("finetune", "finetune.json"), ("evaluate", "metrics.json")):
            if write_killed(
                rule,
                dict(c._asdict()),
                done=Path(layout.cell_file(done, *c)),
                err_paths=[Path(layout.err_file(*c))],
                cell=layout.cell(*c),
                log_path=Path(layout.log(rule, layout.cell_name(*c))),
                since=since,
            ):
                written.append(layout.cell(*c))
    return written


def causes(err_files: list[Path], since: float = 0.0) -> list[str]:
    """'<stage>: <cause>' of each distinct failure among error files written since `since` (a
    failure shared by several cells, such as a bad dataset, is listed once)."""
    seen: dict[str, None] = {}
    for err in err_files:
        if err.stat().st_mtime < since:
            continue
        fields = dict(line.split(": ", 1) for line in err.read_text(errors="replace").splitlines()[:8] if ": " in line)
        seen.setdefault(f"{fields.get('stage', '?')}: {fields.get('cause', 'see ' + str(err))}")
    return list(seen)
