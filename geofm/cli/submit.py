"""geofm-submit: validate an experiment config (CI validate stage), or submit it (submit stage).

    geofm-submit check  config/config.yaml
    geofm-submit submit config/config.yaml --env-file submission.env

`check` judges the config as the watcher will: the same untrusted-config parser (no YTE, no
anchors, plain data, size cap, also for config/config.yaml, which the Snakefile loads), the
same output-path rules, `resolve()` with its cell cap; then `snakemake --dry-run` and
`--lint` with the validated config written as JSON. Dataset roots and weight files that
exist only on the cluster are replaced by the sample data / a placeholder for planning,
with a note (the watcher checks the real ones).

`submit` uploads the committed config with its commit, branch, config path and the job's
GitLab ID token (GEOFM_ID_TOKEN, from `id_tokens:`), and writes SUBMISSION_ID=<id> to the
dotenv file for the wait job. Object storage settings and CI's key come from the environment
(S3_ENDPOINT_URL, S3_BUCKET, S3_PREFIX, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from geofm import config as experiment_config
from geofm import names
from geofm.retry import retry
from geofm.store import DEFAULT_PREFIX, Store, Unavailable
from geofm.watcher.checkout import BASE_CONFIG, merge, overlap_problem, path_problem


def repo() -> Path:
    """The checkout being validated or submitted: the job's working directory (CI_PROJECT_DIR)."""
    return Path.cwd()


def fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


def for_planning(raw: dict, placeholder: Path) -> tuple[dict, list[str]]:
    """The config with cluster-only dataset roots and weight files swapped for local stand-ins."""
    plan, notes = copy.deepcopy(raw), []
    for task, settings in (plan.get("tasks") or {}).items():
        root = settings.get("data_root") if isinstance(settings, dict) else None
        if isinstance(root, str) and not (repo() / root).exists():
            settings["data_root"] = None
            notes.append(f"tasks.{task}.data_root {root} is not on this runner: planned with sample data instead")
    for name, model in (plan.get("models") or {}).items():
        weights = model.get("weights") if isinstance(model, dict) else None
        if isinstance(weights, str) and not (repo() / weights).is_file():
            model["weights"] = str(placeholder)
            notes.append(f"models.{name}.weights {weights} is not on this runner: planned with a placeholder")
    return plan, notes


def untrusted(rel: str) -> dict:
    """The config at `rel` merged over config/config.yaml, as the Snakefile combines them."""
    raw = experiment_config.parse_untrusted((repo() / rel).read_bytes(), rel)
    if rel != BASE_CONFIG and (repo() / BASE_CONFIG).is_file():
        raw = merge(experiment_config.parse_untrusted((repo() / BASE_CONFIG).read_bytes(), BASE_CONFIG), raw)
    return raw


def tracked_top_level() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo(), capture_output=True, timeout=60).stdout.decode()
    return {f.split("/", 1)[0] for f in listed.split("\0") if f}


def check(path: Path) -> int:
    rel = path.as_posix()
    max_cells = int(os.environ.get("GEOFM_MAX_CELLS") or experiment_config.MAX_CELLS)
    try:
        raw = untrusted(rel)
        problem = path_problem(raw)
        if problem:
            return fail(f"config error: {problem}")
        with tempfile.TemporaryDirectory(prefix="geofm-check-") as tmp:
            placeholder = Path(tmp) / "weights.pt"
            placeholder.write_bytes(b"")
            plan, notes = for_planning(raw, placeholder)
            for note in notes:
                print(f"note: {note} (the watcher checks the real one)")
            resolved = experiment_config.resolve(copy.deepcopy(plan), repo(), max_cells=max_cells)
            problem = overlap_problem(resolved, tracked_top_level())
            if problem:
                return fail(f"config error: {problem}")
            print(f"config ok: experiment {resolved['experiment']!r}, {len(experiment_config.cells(resolved))} cells")
            planned = experiment_config.write_json(plan, Path(tmp) / "config.json")
            env = {**os.environ, "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1"}
            snakemake = str(Path(sys.executable).parent / "snakemake")
            for args in (["--dry-run", "--quiet", "rules"], ["--lint"]):
                cmd = [snakemake, "--snakefile", str(repo() / "Snakefile"), *args, "--configfile", str(planned)]
                print("$ snakemake " + " ".join(args), flush=True)
                result = subprocess.run(cmd, cwd=repo(), env=env, timeout=900)
                if result.returncode != 0:
                    return fail(f"snakemake {args[0]} failed (exit status {result.returncode})")
    except experiment_config.ConfigError as e:
        return fail(f"config error: {e}")
    except OSError as e:
        return fail(f"config error: {rel}: {e.strerror}")
    print("validate: ok")
    return 0


def submit(path: Path, env_file: Path | None, token_var: str) -> int:
    env = os.environ
    commit, branch, token = env.get("CI_COMMIT_SHA", ""), env.get("CI_COMMIT_BRANCH", ""), env.get(token_var, "")
    if not names.valid(names.COMMIT, commit) or not names.valid(names.SAFE_BRANCH, branch):
        return fail(
            "submit: CI_COMMIT_SHA and CI_COMMIT_BRANCH are not a commit and a branch: run this in a branch pipeline"
        )
    if not token:
        return fail(f"submit: no ID token in {token_var}; fix: give the job `id_tokens: {token_var}: aud: ...`")
    rel = path.as_posix()
    if not names.config_path(rel):
        return fail(f"submit: {rel!r} is not a relative .yaml path inside the repository")
    text = (repo() / rel).read_bytes()
    committed = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=repo(), capture_output=True, timeout=60)
    if committed.returncode != 0 or committed.stdout != text:
        return fail(f"submit: {rel} differs from the file in commit {commit}: only committed configs are submitted")
    try:
        experiment = experiment_config.validate_schema(untrusted(rel))["experiment"]
    except experiment_config.ConfigError as e:
        return fail(f"config error: {e}")
    if not env.get("S3_BUCKET"):
        return fail("submit: S3_BUCKET is not set (a CI/CD variable)")
    store = Store(env["S3_BUCKET"], env.get("S3_PREFIX") or DEFAULT_PREFIX, env.get("S3_ENDPOINT_URL"))
    meta = {
        "commit": commit,
        "branch": branch,
        "config_path": rel,
        "config_sha256": hashlib.sha256(text).hexdigest(),
        "experiment": experiment,
        "id_token": token,
        "pipeline_url": env.get("CI_PIPELINE_URL", ""),
    }
    sid = retry(lambda: store.submit(text, meta), what="uploading the submission", log=print, on=(Unavailable,),
                cap=60, within=600)  # fmt: skip
    print(f"submitted {rel} at {commit[:10]} ({branch}) as {sid}")
    print(f"status: s3://{store.bucket}/{store.status_key(sid)}")
    if env_file:
        env_file.write_text(f"SUBMISSION_ID={sid}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geofm-submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a config (validate stage)")
    c.add_argument("config", type=Path)
    s = sub.add_parser("submit", help="upload a committed config (submit stage)")
    s.add_argument("config", type=Path)
    s.add_argument("--env-file", type=Path, help="write SUBMISSION_ID=<id> here (a dotenv report)")
    s.add_argument("--id-token-var", default="GEOFM_ID_TOKEN", help="variable holding the job's ID token")
    a = p.parse_args(argv)
    if a.command == "check":
        return check(a.config)
    return submit(a.config, a.env_file, a.id_token_var)


if __name__ == "__main__":
    sys.exit(main())
