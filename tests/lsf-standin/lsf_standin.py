#!/usr/bin/env python3
"""LSF STAND-IN for tests: bsub, bjobs, bkill, bhist, bqueues, badmin, lsclusters on SLURM.

NOT LSF. IBM Spectrum LSF is proprietary and cannot be installed on the test machines, so this
one file answers the few LSF commands that Snakemake's LSF executor plugin (0.3.3) calls, in
the output formats the plugin parses, and runs the jobs on the local SLURM test cluster
(tests/cluster/slurm-up.sh). The command names in bin/ are symlinks to this file; tests put
bin/ first on PATH. What this does and does not prove: README.md beside this file.

Mapping: a job is a SLURM batch job; queue = partition, project = account, `bsub -n` = CPUs
of one task, `-R rusage[mem=M]` = memory per CPU (MB), `-W` = time limit (minutes),
`-gpu num=N[:gmodel=X]` = `--gpus=[X:]N`. Job states: PENDING -> PEND, RUNNING -> RUN,
COMPLETED -> DONE, any other end (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...) -> EXIT.
Stdlib only: it runs under any python3.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("GEOFM_LSF_STANDIN_DIR", "/tmp/geofm-lsf-standin"))
CLUSTER = "geofm-standin"
LSF_STATE = {"PENDING": "PEND", "REQUEUED": "PEND", "RUNNING": "RUN", "COMPLETING": "RUN", "CONFIGURING": "RUN"}
LSF_STATE |= {"SUSPENDED": "SSUSP", "STOPPED": "SSUSP", "COMPLETED": "DONE"}  # every other state: EXIT


def slurm(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SLURM_"))}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=60)


def fail(message: str, code: int = 255) -> int:
    print(message, file=sys.stderr)
    return code


def partitions() -> tuple[list[str], str]:
    out = slurm("sinfo", "-h", "-o", "%P").stdout.split()
    default = next((p.rstrip("*") for p in out if p.endswith("*")), out[0].rstrip("*") if out else "")
    return [p.rstrip("*") for p in out], default


# --- bsub ---------------------------------------------------------------------------------------
VALUED = {"-J", "-o", "-e", "-env", "-P", "-q", "-W", "-n", "-R", "-cwd", "-gpu", "-M"}


def bsub(args: list[str]) -> int:
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in VALUED or i + 1 >= len(args):
            return fail(f"lsf-standin bsub: option {args[i]} is not supported by this stand-in", 2)
        opts.setdefault(args[i], []).append(args[i + 1])
        i += 2
    command = " ".join(args[i:])
    if not command:
        return fail("lsf-standin bsub: no command given", 2)
    one = {k: v[-1] for k, v in opts.items()}
    queue = one.get("-q") or partitions()[1]
    sbatch = ["sbatch", "--parsable", f"--partition={queue}", "--ntasks=1", "--open-mode=append"]
    sbatch.append(f"--cpus-per-task={one.get('-n', '1')}")
    if "-J" in one:
        sbatch.append(f"--job-name={one['-J']}")
    for flag, option in (("-o", "--output"), ("-e", "--error"), ("-cwd", "--chdir")):
        if flag in one:
            sbatch.append(f"{option}={one[flag]}")
    if "-P" in one:
        sbatch.append(f"--account={one['-P']}")
    if "-W" in one:
        sbatch.append(f"--time={one['-W']}")
    env = one.get("-env", "all")
    sbatch.append(
        "--export=ALL" if env.lower() == "all" else "--export=NONE" if env.lower() == "none" else f"--export={env}"
    )
    for request in opts.get("-R", []):
        if m := re.fullmatch(r"rusage\[mem=(\d+(?:\.\d+)?)\]", request):
            sbatch.append(f"--mem-per-cpu={max(1, round(float(m[1])))}")
        elif m := re.fullmatch(r"span\[hosts=(\d+)\]", request):
            sbatch.append(f"--nodes={m[1]}")
        else:
            return fail(f"lsf-standin bsub: -R {request!r} is not supported by this stand-in", 2)
    if "-gpu" in one:
        gpu = dict(part.split("=", 1) for part in one["-gpu"].split(":") if "=" in part)
        model = f"{gpu['gmodel']}:" if gpu.get("gmodel") else ""
        sbatch.append(f"--gpus={model}{gpu.get('num', '1')}")
    if "-M" in one:
        sbatch.append(f"--mem={one['-M']}")
    # The job sees LSF's variables, as under LSF (errors.scheduler_log() reads them).
    out = one.get("-o", "")
    script = (
        "#!/bin/sh\n"
        f"export LSB_JOBID=$SLURM_JOB_ID LSB_JOBNAME={shlex.quote(one.get('-J', ''))} LSB_QUEUE={shlex.quote(queue)}\n"
        + (f"export LSB_OUTPUTFILE={shlex.quote(out)}\n" if out else "")
        + command
        + "\n"
    )
    done = slurm(*sbatch, stdin=script)
    if done.returncode != 0:
        said = done.stderr.strip()
        if "invalid partition" in said.lower():
            return fail(f"{queue}: No such queue. Job not submitted.")
        if "invalid account" in said.lower():
            return fail(f"{one.get('-P', '')}: Not a valid project for user. Job not submitted. ({said})")
        return fail(f"Job not submitted. ({said})")
    print(f"Job <{done.stdout.strip().split(';')[0]}> is submitted to queue <{queue}>.")
    return 0


# --- bjobs / bkill / bhist ----------------------------------------------------------------------
def jobs() -> dict[str, dict]:
    """This user's jobs of the last two days: from sacct (ended) and squeue (live, wins)."""
    found: dict[str, dict] = {}
    acct = slurm(
        "sacct", "-X", "-n", "-P", "-S", "now-2days", "-o", "JobIdRaw,JobName%300,State,Partition,ExitCode,Account"
    )
    for line in acct.stdout.splitlines():
        jid, name, state, queue, code, account = (line.split("|") + [""] * 6)[:6]
        found[jid] = dict(
            jobid=jid, job_name=name, state=state.split()[0] if state else "", queue=queue, exit_code=code
        )
        found[jid]["project"] = account
    live = slurm("squeue", "-h", "-t", "all", "-o", "%i|%T|%P|%a|%j")
    for line in live.stdout.splitlines():
        jid, state, queue, account, name = (line.split("|", 4) + [""] * 5)[:5]
        found.setdefault(jid, dict(jobid=jid, exit_code="", project=account))
        found[jid].update(job_name=name, state=state, queue=queue)
    for job in found.values():
        job["stat"] = LSF_STATE.get(job["state"], "EXIT")
        job["exit_code"] = job["exit_code"].split(":")[0] if job["exit_code"] else "-"
    return found


def bjobs(args: list[str]) -> int:
    header, fields, show_all, pattern, ids = True, ["jobid", "stat", "queue", "job_name"], False, None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-noheader":
            header = False
        elif a == "-o":
            fields, i = args[i + 1].replace(",", " ").split(), i + 1
        elif a in ("-a", "-aJ", "-J"):
            show_all = show_all or a.startswith("-a")
            if a.endswith("J"):
                pattern, i = args[i + 1], i + 1
        elif a.startswith("-"):
            return fail(f"lsf-standin bjobs: option {a} is not supported by this stand-in", 2)
        else:
            ids.append(a)
        i += 1
    rows = [
        j
        for j in jobs().values()
        if (show_all or ids or j["stat"] in ("PEND", "RUN", "SSUSP"))
        and (pattern is None or fnmatch.fnmatchcase(j["job_name"], pattern))
        and (not ids or j["jobid"] in ids)
    ]
    if not rows:
        return fail("No matching job found" if pattern or ids else "No unfinished job found")
    if header:
        print(" ".join(f.upper() for f in fields))
    for j in sorted(rows, key=lambda j: int(j["jobid"])):
        print(" ".join(str(j.get(f, "-")) or "-" for f in fields))
    return 0


def bkill(args: list[str]) -> int:
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        return fail("lsf-standin bkill: job IDs required", 2)
    known = jobs()
    for jid in ids:
        if jid not in known:
            print(f"Job <{jid}>: No matching job found", file=sys.stderr)
            continue
        slurm("scancel", jid)
        print(f"Job <{jid}> is being terminated")
    return 0


def bhist(args: list[str]) -> int:
    for j in sorted(jobs().values(), key=lambda j: int(j["jobid"])):
        print(f"Job <{j['jobid']}>, Job Name <{j['job_name']}>, User <{os.environ.get('USER', 'root')}>, ")
        print(f"                     Project <{j['project']}>, Status <{j['stat']}>, Queue <{j['queue']}>")
        print()
    return 0


# --- configuration: badmin showconf mbd, lsclusters, bqueues -------------------------------------
def config_tree() -> dict[str, str]:
    """LSF's configuration as the plugin reads it: LSB_SHAREDIR, LSF_CONFDIR and lsb.params."""
    conf, share = STATE / "conf", STATE / "work"
    params = conf / "lsbatch" / CLUSTER / "configdir" / "lsb.params"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(
        f"# Written by the LSF stand-in (tests/lsf-standin): not a real LSF configuration.\n"
        f"Begin Parameters\nDEFAULT_QUEUE = {partitions()[1]}   # the SLURM default partition\nEnd Parameters\n"
    )
    events = share / CLUSTER / "logdir" / "lsb.events"
    events.parent.mkdir(parents=True, exist_ok=True)
    events.touch()  # the plugin falls back to this file; the stand-in's bjobs already knows every job
    return {"LSB_SHAREDIR": str(share), "LSF_CONFDIR": str(conf), "LSF_UNIT_FOR_LIMITS": "MB"}


def badmin(args: list[str]) -> int:
    if args[:2] != ["showconf", "mbd"]:
        return fail("lsf-standin badmin: only `badmin showconf mbd` is supported by this stand-in", 2)
    print(f"MBD configuration at {time.ctime()} (LSF stand-in for tests, backed by SLURM)")
    for key, value in config_tree().items():
        print(f"    {key} = {value}")
    return 0


def lsclusters(args: list[str]) -> int:
    print("CLUSTER_NAME   STATUS   MASTER_HOST               ADMIN    HOSTS  SERVERS")
    print(f"{CLUSTER}  ok       localhost                 root         1        1")
    return 0


def bqueues(args: list[str]) -> int:
    names = [a for a in args if not a.startswith("-")]
    known, _ = partitions()
    missing = [n for n in names if n not in known]
    if missing:
        return fail("\n".join(f"{n}: No such queue" for n in missing))
    print("QUEUE_NAME      PRIO STATUS          MAX JL/U JL/P JL/H NJOBS  PEND   RUN  SUSP")
    for name in names or known:
        print(f"{name:<15} 30   Open:Active       -    -    -    -     0     0     0     0")
    return 0


COMMANDS = dict(bsub=bsub, bjobs=bjobs, bkill=bkill, bhist=bhist, badmin=badmin, lsclusters=lsclusters, bqueues=bqueues)

if __name__ == "__main__":
    name = Path(sys.argv[0]).name
    if name not in COMMANDS:
        sys.exit(fail(f"lsf_standin.py: call it as one of {', '.join(COMMANDS)} (symlinks in bin/)", 2))
    sys.exit(COMMANDS[name](sys.argv[1:]))
