"""geofm-watcher: run the experiments that CI submits to object storage (see geofm/watcher/).

Run it on the cluster's login node from the operator's own installation of the project
(its clone, its .venv, its profiles), as a service under its own user
(geofm/watcher/geofm-watcher.service):

    geofm-watcher --repo /srv/geofm/clone --home /srv/geofm/home --profile profiles/slurm \\
        --issuer https://gitlab.example.com --jwks-url https://gitlab.example.com/oauth/discovery/keys \\
        --audience geofm-watcher --project group/geofm-pipeline \\
        --dvc-remote s3://experiments/dvc --scratch-root /scratch/geofm --cache-root /shared/geofm-cache

Credentials come from the environment only, never from the command line:
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY     the watcher's key of the bucket
    GEOFM_DVC_ACCESS_KEY_ID / ..._SECRET_ACCESS_KEY  the DVC remote's key
    GEOFM_GIT_TOKEN                               push access to the GitLab project
None of them reaches the Snakemake child or its jobs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from geofm import names
from geofm.config import MAX_CELLS
from geofm.store import DEFAULT_PREFIX, Store
from geofm.watcher.checkout import Operator
from geofm.watcher.loop import Settings, Watcher
from geofm.watcher.publish import DvcRemote
from geofm.watcher.runner import Runner
from geofm.watcher.token import Policy, Verifier

INSTALL = Path(__file__).resolve().parent.parent.parent  # the watcher's own installation


def parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(prog="geofm-watcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = p.add_argument
    a("--repo", type=Path, default=INSTALL, help="the watcher's own clone to fetch into (default: this installation)")
    a("--remote", default="origin", help="git remote of the GitLab project (default: origin)")
    a("--home", type=Path, help="runs, logs and state (default: ~/.cache/geofm-watcher/<name>)")
    a("--name", default=env.get("GEOFM_WATCHER_NAME", f"{socket.gethostname()}-{os.getuid()}"),
      help="this watcher's name in leases; keep it across restarts (default: host-uid)")  # fmt: skip
    a("--endpoint", default=env.get("S3_ENDPOINT_URL"), help="S3 endpoint URL (env S3_ENDPOINT_URL)")
    a("--bucket", default=env.get("S3_BUCKET"), help="bucket (env S3_BUCKET)")
    a("--prefix", default=env.get("S3_PREFIX", DEFAULT_PREFIX), help="key prefix (env S3_PREFIX)")
    g = p.add_argument_group("trust: which submissions run")
    g.add_argument("--issuer", required=True, help="GitLab instance URL, the ID tokens' iss")
    g.add_argument("--jwks-url", help="the instance's JWKS (default: <issuer>/oauth/discovery/keys)")
    g.add_argument("--audience", default="geofm-watcher", help="the ID tokens' aud (ci/.gitlab-ci.yml)")
    g.add_argument("--project", action="append", required=True, help="allowed project path (repeatable)")
    g.add_argument("--require-protected", action="store_true", help="only commits of protected branches")
    g = p.add_argument_group("runs")
    g.add_argument("--profile", help="snakemake --profile from this installation, e.g. profiles/slurm")
    g.add_argument(
        "--workflow-profile", default="profiles/default", help="from this installation (default: %(default)s)"
    )
    g.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    g.add_argument("--deadline", type=float, default=7 * 86400, help="seconds a submission may run (default: 7 days)")
    g.add_argument("--max-cells", type=int, default=MAX_CELLS, help="cells per experiment (default: %(default)s)")
    g.add_argument("--scratch-root", type=Path, help="shared scratch; each run gets <root>/<submission id>")
    g.add_argument("--cache-root", type=Path, help="shared caches (weights, registry, sample data)")
    g.add_argument("--pass-env", action="append", default=[], help="environment variable (glob) the runs may see")
    g.add_argument("--run-as", help="run Snakemake as this user (as root directly, else through sudo -n)")
    g.add_argument("--snakemake", default=str(Path(sys.executable).parent / "snakemake"), help="snakemake executable")
    g.add_argument("--stop-timeout", type=float, default=120.0, help="seconds Snakemake gets to stop its jobs")
    g = p.add_argument_group("results")
    g.add_argument("--dvc-remote", default=env.get("GEOFM_DVC_REMOTE"), help="DVC remote URL, e.g. s3://bucket/dvc")
    g.add_argument("--dvc-endpoint", default=env.get("GEOFM_DVC_ENDPOINT"), help="the DVC remote's S3 endpoint")
    g.add_argument("--keep-runs", type=int, default=10, help="finished runs kept on disk for inspection")
    g = p.add_argument_group("timing")
    g.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the queue (default: 30)")
    g.add_argument("--lease-ttl", type=float, default=600.0, help="seconds without renewal before a takeover")
    g.add_argument("--max-backoff", type=float, default=300.0, help="longest wait between retries")
    g.add_argument("--fetch-within", type=float, default=1800.0, help="seconds of git outage before requeueing")
    g.add_argument("--push-within", type=float, default=600.0, help="seconds of push failures before deferring")
    g.add_argument("--once", action="store_true", help="handle at most one submission, then exit")
    a("snakemake_args", nargs="*", help="further snakemake arguments, after '--'")
    return p


def _installed(path: str | None) -> Path | None:
    """A profile from the watcher's own installation (absolute paths are taken as they are)."""
    if not path or path == "none":
        return None
    p = Path(path)
    return p if p.is_absolute() else INSTALL / p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    env = os.environ
    if not a.bucket:
        p.error("no bucket: set S3_BUCKET or pass --bucket")
    if not a.dvc_remote:
        p.error("no DVC remote: pass --dvc-remote (the operator's; the checkout's .dvc/config is never used)")
    if not names.valid(names.WATCHER_NAME, a.name):
        p.error(f"--name {a.name!r}: use letters, digits, '.', '_', '@' or '-'")
    for project in a.project:
        if not names.valid(names.PROJECT_PATH, project):
            p.error(f"--project {project!r} is not a project path (group/project)")
    for root in (a.scratch_root, a.cache_root):
        if root is not None and not root.is_absolute():
            p.error(f"{root}: --scratch-root and --cache-root must be absolute")
    if not (a.repo / ".git").exists():
        p.error(f"--repo {a.repo} is not a git clone")
    dvc_keys = {"AWS_ACCESS_KEY_ID": env.get("GEOFM_DVC_ACCESS_KEY_ID", ""),
                "AWS_SECRET_ACCESS_KEY": env.get("GEOFM_DVC_SECRET_ACCESS_KEY", "")}  # fmt: skip
    if not all(dvc_keys.values()):
        print("geofm-watcher: GEOFM_DVC_ACCESS_KEY_ID/GEOFM_DVC_SECRET_ACCESS_KEY not set: the DVC remote gets the "
              "bucket key (see README, Operator: give the DVC remote its own key)", file=sys.stderr)  # fmt: skip
        dvc_keys = {k: env.get(k, "") for k in dvc_keys}
    policy = Policy(jwks_url=a.jwks_url or a.issuer.rstrip("/") + "/oauth/discovery/keys", issuer=a.issuer,
                    audience=a.audience, projects=tuple(a.project), require_protected=a.require_protected)  # fmt: skip
    runner = Runner(a.snakemake, extra_args=a.snakemake_args, cores=a.cores, profile=_installed(a.profile),
                    workflow_profile=_installed(a.workflow_profile), pass_env=tuple(a.pass_env),
                    stop_timeout=a.stop_timeout, run_as=a.run_as)  # fmt: skip
    settings = Settings(
        repo=a.repo.resolve(),
        home=(a.home or Path.home() / ".cache" / "geofm-watcher" / a.name).resolve(),
        store=Store(a.bucket, a.prefix, a.endpoint),
        verifier=Verifier(policy),
        runner=runner,
        dvc=DvcRemote(a.dvc_remote, a.dvc_endpoint, dvc_keys),
        operator=Operator(a.max_cells, a.scratch_root, a.cache_root),
        name=a.name,
        remote=a.remote,
        poll_s=a.poll,
        lease_ttl_s=a.lease_ttl,
        max_backoff_s=a.max_backoff,
        deadline_s=a.deadline,
        fetch_within_s=a.fetch_within,
        push_within_s=a.push_within,
        keep_runs=a.keep_runs,
        run_as=a.run_as,
        once=a.once,
    )
    return Watcher(settings).run()


if __name__ == "__main__":
    sys.exit(main())
