#!/usr/bin/env python3
"""CI helper: validate an experiment config, or submit it to object storage for the watcher.

    python scripts/submit.py check  config/config.yaml    # validate stage
    python scripts/submit.py submit config/config.yaml --env-file submission.env   # submit stage

`check` validates the config as the workflow will (schema, names, TerraTorch registry,
output paths the watcher accepts), then runs `snakemake --dry-run` and `snakemake --lint`
with it. Dataset roots and weight files that exist only on the cluster are replaced by the
sample data / a placeholder for planning, with a note (the watcher's run checks the real ones).

`submit` uploads the committed config with its metadata (commit, branch, repository,
pipeline) read from GitLab's predefined variables, and writes SUBMISSION_ID=<id> to the
dotenv file for the wait job. Object storage settings and credentials come from the
environment (S3_ENDPOINT_URL, S3_BUCKET, S3_PREFIX, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from geofm import config as experiment_config  # noqa: E402
from geofm import cos  # noqa: E402
from geofm.watcher import SAFE_CONFIG_PATH, path_problem  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


def load(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise experiment_config.ConfigError(f"{path}: not a mapping of settings; fix: see config/schema.yaml")
    return raw


def for_planning(raw: dict, placeholder: Path) -> tuple[dict, list[str]]:
    """The config with cluster-only dataset roots and weight files swapped for local stand-ins."""
    plan, notes = copy.deepcopy(raw), []
    for task, settings in (plan.get("tasks") or {}).items():
        root = settings.get("data_root") if isinstance(settings, dict) else None
        if isinstance(root, str) and not (REPO / root).exists():
            settings["data_root"] = None
            notes.append(f"tasks.{task}.data_root {root} is not on this runner: planned with sample data instead")
    for name, model in (plan.get("models") or {}).items():
        weights = model.get("weights") if isinstance(model, dict) else None
        if isinstance(weights, str) and not (REPO / weights).is_file():
            model["weights"] = str(placeholder)
            notes.append(f"models.{name}.weights {weights} is not on this runner: planned with a placeholder")
    return plan, notes


def check(path: Path) -> int:
    try:
        raw = load(path if path.is_absolute() else REPO / path)
        with tempfile.TemporaryDirectory(prefix="geofm-check-") as tmp:
            placeholder = Path(tmp) / "weights.pt"
            placeholder.write_bytes(b"")
            plan, notes = for_planning(raw, placeholder)
            for note in notes:
                print(f"note: {note} (the watcher checks the real one)")
            resolved = experiment_config.resolve(plan, REPO)
            problem = path_problem(resolved)
            if problem:
                return fail(f"config error: {problem}")
            print(f"config ok: experiment {resolved['experiment']!r}, {len(experiment_config.cells(resolved))} cells")
            planned = Path(tmp) / "config.yaml"
            planned.write_text(yaml.safe_dump(plan, sort_keys=False))
            env = {**os.environ, "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1"}
            for args in (["--dry-run", "--quiet", "rules"], ["--lint"]):
                cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), *args, "--configfile", str(planned)]
                print("$ snakemake " + " ".join(args), flush=True)
                result = subprocess.run(cmd, cwd=REPO, env=env, timeout=900)
                if result.returncode != 0:
                    return fail(f"snakemake {args[0]} failed (exit status {result.returncode})")
    except experiment_config.ConfigError as e:
        return fail(f"config error: {e}")
    except (OSError, yaml.YAMLError) as e:
        return fail(f"config error: {path}: {str(e).splitlines()[0]}")
    print("validate: ok")
    return 0


def submit(path: Path, env_file: Path | None) -> int:
    env = os.environ
    commit, branch = env.get("CI_COMMIT_SHA", ""), env.get("CI_COMMIT_BRANCH", "")
    if not commit or not branch:
        return fail("submit: CI_COMMIT_SHA and CI_COMMIT_BRANCH are not set: run this in a branch pipeline")
    rel = path.as_posix()
    if not SAFE_CONFIG_PATH.match(rel) or ".." in rel.split("/"):
        return fail(f"submit: {rel!r} is not a relative .yaml path inside the repository")
    text = (REPO / rel).read_bytes()
    committed = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=REPO, capture_output=True, timeout=60)
    if committed.returncode != 0 or committed.stdout != text:
        return fail(f"submit: {rel} differs from the file in commit {commit}: only committed configs are submitted")
    try:
        experiment = experiment_config.validate_schema(load(REPO / rel))["experiment"]
    except experiment_config.ConfigError as e:
        return fail(f"config error: {e}")
    if not env.get("S3_BUCKET"):
        return fail("submit: S3_BUCKET is not set (a CI/CD variable)")
    store = cos.Store(env["S3_BUCKET"], env.get("S3_PREFIX") or cos.DEFAULT_PREFIX, env.get("S3_ENDPOINT_URL"))
    meta = {
        "commit": commit,
        "branch": branch,
        "config_path": rel,
        "config_sha256": hashlib.sha256(text).hexdigest(),
        "experiment": experiment,
        "repository": env.get("CI_PROJECT_PATH", ""),
        "repository_url": env.get("CI_PROJECT_URL", ""),
        "pipeline_id": env.get("CI_PIPELINE_ID", ""),
        "pipeline_url": env.get("CI_PIPELINE_URL", ""),
        "submitted_by": env.get("GITLAB_USER_LOGIN", ""),
    }
    deadline = time.monotonic() + 600
    sid = cos.retrying(lambda: store.submit(text, meta), what="object store", cap=60, deadline=deadline)
    print(f"submitted {rel} at {commit[:10]} ({branch}) as {sid}")
    print(f"status: s3://{store.bucket}/{store.key(sid, 'status.json')}")
    if env_file:
        env_file.write_text(f"SUBMISSION_ID={sid}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a config (validate stage)")
    c.add_argument("config", type=Path)
    s = sub.add_parser("submit", help="upload a committed config (submit stage)")
    s.add_argument("config", type=Path)
    s.add_argument("--env-file", type=Path, help="write SUBMISSION_ID=<id> here (a dotenv report)")
    a = p.parse_args(argv)
    if a.command == "check":
        return check(a.config)
    return submit(a.config, a.env_file)


if __name__ == "__main__":
    sys.exit(main())
