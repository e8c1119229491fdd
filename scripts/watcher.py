#!/usr/bin/env python3
"""COS watcher: run the experiments that CI submits to object storage (see geofm/watcher.py).

Run it on the cluster's login node, from a clone of the project with a ready .venv:

    export S3_ENDPOINT_URL=https://... S3_BUCKET=geofm-experiments
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # object storage (and DVC remote)
    export GEOFM_GIT_TOKEN=...                               # push access to the GitLab project
    .venv/bin/python scripts/watcher.py --profile profiles/slurm

Credentials are read from the environment only; they are never passed on the command line.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geofm import cos  # noqa: E402
from geofm.watcher import Settings, Watcher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    default_name = f"{socket.gethostname()}-{os.getuid()}"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="clone of the project to fetch submitted commits into (default: this one)")  # fmt: skip
    p.add_argument("--remote", default="origin", help="git remote of the GitLab project (default: origin)")
    p.add_argument("--home", type=Path, default=None,
                   help="worktrees, logs and caches (default: ~/.cache/geofm-watcher/<name>)")  # fmt: skip
    p.add_argument("--name", default=env.get("GEOFM_WATCHER_NAME", default_name),
                   help="this watcher's name in leases; keep it across restarts (default: host-uid)")  # fmt: skip
    p.add_argument("--endpoint", default=env.get("S3_ENDPOINT_URL"), help="S3 endpoint URL (env S3_ENDPOINT_URL)")
    p.add_argument("--bucket", default=env.get("S3_BUCKET"), help="bucket (env S3_BUCKET)")
    p.add_argument("--prefix", default=env.get("S3_PREFIX", cos.DEFAULT_PREFIX), help="key prefix (env S3_PREFIX)")
    p.add_argument("--profile", default=None, help="snakemake --profile for the runs, e.g. profiles/slurm")
    p.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the queue (default: 30)")
    p.add_argument("--lease-ttl", type=float, default=600.0,
                   help="seconds without renewal after which another watcher may take a run over (default: 600)")  # fmt: skip
    p.add_argument("--max-backoff", type=float, default=300.0, help="longest wait between retries (default: 300)")
    p.add_argument("--stop-timeout", type=float, default=120.0,
                   help="seconds Snakemake gets to stop its jobs on SIGTERM before it is killed (default: 120)")  # fmt: skip
    p.add_argument("--keep-worktrees", type=int, default=10, help="finished worktrees kept for inspection")
    p.add_argument("--snakemake", default=str(Path(sys.executable).parent / "snakemake"), help="snakemake executable")
    p.add_argument("--once", action="store_true", help="run at most one submission, then exit (for cron)")
    p.add_argument("snakemake_args", nargs="*", help="further snakemake arguments, after '--'")
    a = p.parse_args(argv)
    if not a.bucket:
        p.error("no bucket: set S3_BUCKET or pass --bucket")
    if not (a.repo / ".git").exists():
        p.error(f"--repo {a.repo} is not a git clone")
    home = a.home or Path.home() / ".cache" / "geofm-watcher" / a.name
    settings = Settings(
        repo=a.repo.resolve(),
        home=home.resolve(),
        store=cos.Store(a.bucket, a.prefix, a.endpoint),
        name=a.name,
        remote=a.remote,
        profile=a.profile,
        cores=a.cores,
        poll_s=a.poll,
        lease_ttl_s=a.lease_ttl,
        max_backoff_s=a.max_backoff,
        stop_timeout_s=a.stop_timeout,
        keep_worktrees=a.keep_worktrees,
        snakemake=a.snakemake,
        snakemake_args=a.snakemake_args,
        once=a.once,
    )
    return Watcher(settings).run()


if __name__ == "__main__":
    sys.exit(main())
