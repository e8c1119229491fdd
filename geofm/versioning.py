"""Prepare one experiment folder's version: large files with DVC, small text with git. No push.

Used by the `version` and `version_evidence` rules (rules/version.smk), which run inside the
submitted code's Snakemake child and so hold no credentials. For `results/<experiment>/`:

- top-level entries named in `versioning.git` (default: out, err) are committed to git as
  plain files (summary, metrics, resources, configs, error files); a binary file there, or
  one larger than `versioning.git_max_kb`, is stored with DVC instead (its own .dvc file);
- every other top-level entry (predictions/, logs/, benchmarks/, ...) is `dvc add`ed as one
  output (into the checkout's DVC cache, `.dvc/cache`);
- the .dvc files, DVC's .gitignore entries and `submission.json` (which config commit and
  submission produced the folder, and whether the run succeeded) are committed too.

The results commit is built on a private index: the fetched branch tip's tree
(`refs/remotes/<remote>/<branch>`, which the watcher put in the checkout; else HEAD) with the
experiment folder replaced by this run's folder, so it holds exactly this run's files. It is
left at `refs/geofm/results` and named in the receipt. The watcher (geofm/watcher/publish.py),
trusted code with the credentials, checks it, pushes the DVC objects and the commit, and lays
the folder onto a branch tip that moved meanwhile.

`Runner` and `git_env` are shared with the watcher: a token in GEOFM_GIT_TOKEN (present only
in the watcher's environment) is sent as an HTTP header through git's environment, never
written to a config file or a URL, so git cannot print it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from geofm import names
from geofm.store import scrub, secret_values

SUBMISSION_FILE = "submission.json"
RESULTS_TRAILER = "Geofm-Results"
RESULTS_REF = "refs/geofm/results"  # where the prepared results commit waits for the watcher


class VersioningError(RuntimeError):
    pass


def dvc_executable() -> str:
    """DVC from this Python's environment (a watcher started as .venv/bin/python has no
    activated venv on PATH), else whatever `dvc` is on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def _basic(token: str) -> str:
    return base64.b64encode(f"oauth2:{token}".encode()).decode()


def git_env(base: dict | None = None) -> dict:
    """Environment for git: a token from GEOFM_GIT_TOKEN becomes an HTTP auth header via
    GIT_CONFIG_* variables (git >= 2.31), so it is never stored in .git/config or a URL."""
    env = dict(os.environ if base is None else base)
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env["GIT_LITERAL_PATHSPECS"] = "1"  # file names are data, never patterns
    token = env.get("GEOFM_GIT_TOKEN")
    if token:
        n = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        env[f"GIT_CONFIG_KEY_{n}"] = "http.extraHeader"
        env[f"GIT_CONFIG_VALUE_{n}"] = f"Authorization: Basic {_basic(token)}"
        env["GIT_CONFIG_COUNT"] = str(n + 1)
    return env


def secrets_of(env: dict) -> list[str]:
    """Credential values in `env`, plus the auth header derived from the git token."""
    values = secret_values(env)
    if env.get("GEOFM_GIT_TOKEN"):
        values.append(_basic(env["GEOFM_GIT_TOKEN"]))
    return values


class Runner:
    """Run commands as argument lists (never through a shell), log them, scrub secrets."""

    def __init__(self, cwd: Path, log: Callable[[str], None] = print, env: dict | None = None):
        self.cwd, self.log = Path(cwd), log
        self.env = git_env(env)
        self.secrets = secrets_of(self.env)

    def __call__(self, *cmd: str, check: bool = True, timeout: float = 600, env: dict | None = None,
                 input: str | None = None, quiet: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
        self.log("$ " + " ".join(cmd))
        try:
            result = subprocess.run(
                list(cmd), cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                timeout=timeout, input=input,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise VersioningError(f"{cmd[0]} {cmd[1]} did not finish within {timeout:.0f} s") from None
        output = scrub((result.stdout + result.stderr).strip(), self.secrets)
        if output and not (quiet and result.returncode == 0):
            self.log(output[-4000:])
        if check and result.returncode != 0:
            last = output.splitlines()[-1] if output else f"exit status {result.returncode}"
            raise VersioningError(f"{cmd[0]} {cmd[1]} failed: {last}")
        return result


def plan(exp_dir: Path, git_entries: list[str], max_bytes: int) -> tuple[list[Path], list[Path]]:
    """(files for git, outputs for DVC) of an experiment folder; refuses symbolic links."""
    git_files: list[Path] = []
    dvc_targets: list[Path] = []
    for entry in sorted(exp_dir.iterdir()):
        name = entry.name
        if entry.is_symlink():
            raise VersioningError(f"{entry}: symbolic links are not versioned; fix: write real files")
        if name == ".gitignore" or name.endswith(".dvc") or name == SUBMISSION_FILE:
            continue  # written below
        if name not in git_entries:
            dvc_targets.append(entry)
            continue
        files = [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if not p.is_dir())
        for f in files:
            if f.is_symlink():
                raise VersioningError(f"{f}: symbolic links are not versioned; fix: write real files")
            if f.name == ".gitignore" or f.name.endswith(".dvc"):
                continue
            (dvc_targets if f.stat().st_size > max_bytes or _binary(f) else git_files).append(f)
    return git_files, dvc_targets


def _binary(path: Path) -> bool:
    """Git is for small text; an image or other binary file goes to DVC."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _relative_inside(root: Path, path: Path) -> Path:
    real = path.resolve()
    if real != root.resolve() and root.resolve() not in real.parents:
        raise VersioningError(f"{path} is outside the repository {root}; fix: keep results_dir inside it")
    return real.relative_to(root.resolve())


def prepare(
    workdir: Path,
    exp_dir: Path,
    *,
    experiment: str,
    outcome: str,
    settings: dict,
    receipt: Path,
    log: Callable[[str], None] = print,
    env: dict | None = None,
) -> dict:
    """dvc add + the results commit of `exp_dir` (a results/<experiment> folder of the git
    checkout at `workdir`), left at RESULTS_REF; the receipt names it. Nothing is pushed."""
    run = Runner(workdir, log, env)
    root = Path(run("git", "rev-parse", "--show-toplevel", quiet=True).stdout.strip()).resolve()
    run.cwd = root
    exp_rel = _relative_inside(root, Path(workdir) / exp_dir)
    exp = root / exp_rel
    if not exp.is_dir():
        raise VersioningError(f"{exp_rel}: no results to version")
    remote = settings.get("git_remote") or "origin"
    if not names.valid(names.SAFE_REMOTE, remote):
        raise VersioningError(f"versioning.git_remote: {remote!r} is not a remote name")
    branch = (
        settings.get("branch") or run("git", "symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
    )
    if not names.valid(names.SAFE_BRANCH, branch):
        raise VersioningError(f"versioning.branch: {branch!r} is not a branch name; fix: set versioning.branch")
    config_commit = settings.get("config_commit") or run("git", "rev-parse", "HEAD", quiet=True).stdout.strip()
    if not names.valid(names.COMMIT, config_commit):
        raise VersioningError(f"versioning.config_commit: {config_commit!r} is not a full commit id")
    probe = exp_rel / "probe.dvc"
    ignored = run("git", "check-ignore", "-q", "--no-index", "--", str(probe), check=False,
                  env={"GIT_LITERAL_PATHSPECS": "0"}).returncode  # fmt: skip
    if ignored not in (0, 1):
        raise VersioningError(f"git check-ignore failed on {probe}")
    if ignored == 0:
        raise VersioningError(
            f"{exp_rel}: .dvc files there are git-ignored, so DVC cannot track results; fix: in .gitignore "
            "ignore the results' contents but not their .dvc files (see README, Commit-triggered experiments)"
        )

    sid = settings.get("submission", "")
    (exp / SUBMISSION_FILE).write_text(
        json.dumps({"experiment": experiment, "outcome": outcome, "config_commit": config_commit, "branch": branch,
                    "submission": sid}, indent=2) + "\n"
    )  # fmt: skip
    max_bytes = int(settings.get("git_max_kb", 512)) * 1024
    git_files, dvc_targets = plan(exp, list(settings.get("git", ["out", "err"])), max_bytes)

    dvc_files: list[Path] = []
    if dvc_targets:
        rel = [str(t.relative_to(root)) for t in dvc_targets]
        run(dvc_executable(), "add", "--quiet", *rel, timeout=3600)
        dvc_files = [Path(r + ".dvc") for r in rel]

    files = [str(f.relative_to(root)) for f in git_files] + [str(f) for f in dvc_files]
    files += [str(p.relative_to(root)) for p in exp.rglob(".gitignore")] + [str(exp_rel / SUBMISSION_FILE)]
    message = (
        f"results: {experiment} {outcome} (config {config_commit[:10]}) [skip ci]\n\n"
        f"Experiment {experiment!r} from config commit {config_commit}, {outcome}.\n"
        f"Restore the files: git checkout <this commit> && dvc pull -R {exp_rel}\n\n"
        f"{RESULTS_TRAILER}: {experiment}\n"
        f"Config-Commit: {config_commit}\n"
        f"Outcome: {outcome}\n" + (f"Submission: {sid}\n" if sid else "")
    )
    tip = f"refs/remotes/{remote}/{branch}"
    has_tip = run("git", "rev-parse", "--verify", "--quiet", f"{tip}^{{commit}}", check=False, quiet=True)
    base = (
        has_tip.stdout.strip()
        if has_tip.returncode == 0
        else run("git", "rev-parse", "HEAD", quiet=True).stdout.strip()
    )
    commit = build_commit(run, base, exp_rel, files, message)
    run("git", "update-ref", RESULTS_REF, commit)
    doc = {
        "experiment": experiment,
        "outcome": outcome,
        "results_commit": commit,
        "base": base,
        "config_commit": config_commit,
        "branch": branch,
        "submission": sid,
        "dvc_files": [str(f) for f in dvc_files],
        "git_files": len(files),
    }
    receipt = Path(receipt)
    receipt.parent.mkdir(parents=True, exist_ok=True)
    receipt.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"prepared {exp_rel} as {commit} on {base[:10]} ({RESULTS_REF}); the watcher pushes it")
    return doc


def build_commit(run: Runner, base: str, exp_rel: Path, files: list[str], message: str) -> str:
    """A commit on `base` whose experiment folder is exactly `files`; `base` if nothing changed."""
    with tempfile.TemporaryDirectory(prefix="geofm-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        run("git", "read-tree", base, env=env)
        run("git", "rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", str(exp_rel), env=env)
        run("git", "add", "--force", "--pathspec-from-file=-", "--pathspec-file-nul", env=env, input="\0".join(files))
        tree = run("git", "write-tree", env=env, quiet=True).stdout.strip()
    if tree == run("git", "rev-parse", f"{base}^{{tree}}", quiet=True).stdout.strip():
        return base
    return run(
        "git", "commit-tree", tree, "-p", base, "-F", "-", env=identity(), input=message, quiet=True
    ).stdout.strip()


def identity() -> dict:
    return {
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "geofm watcher"),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "geofm-watcher@localhost"),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "geofm watcher"),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "geofm-watcher@localhost"),
    }


def clean_experiment(worktree: Path, exp_rel: Path) -> None:
    """Remove a results folder checked out from git, so a new run starts from nothing."""
    target = Path(worktree) / exp_rel
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
