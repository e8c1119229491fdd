"""From a verified submission to a checkout and a config file Snakemake can run, or a refusal.

- The watcher's own clone (`Mirror`, trusted: only the watcher writes it) fetches the branch
  with the watcher's git credentials, and requires the submitted commit to be an ancestor of
  the fetched `origin/<branch>` (`git merge-base --is-ancestor`): only reviewed commits run.
- Each submission gets its own checkout (`<home>/runs/<id>/checkout`, a fresh repository
  created with no hook templates, `core.hooksPath` pointing at /dev/null, filled from the
  mirror over `file://`): the run never shares the watcher's clone, its `.git` or its venv.
  After the run the watcher never runs git inside that checkout again; it fetches the
  prepared results commit from it over `file://` (git's upload-pack honours no hooks and no
  repository-local commands of the repository it serves).
- The uploaded config must be byte-identical to the committed file; it and the checkout's
  `config/config.yaml` (which the Snakefile's `configfile:` loads, with YTE) must pass
  `parse_untrusted` (no YTE, no anchors, plain data, size cap). The effective config (the
  two merged as Snakemake merges them, plus the watcher's settings) is validated with
  `resolve()` and written as JSON: Snakemake gets exactly what was checked.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from geofm import config as experiment_config
from geofm import names
from geofm.retry import Transient, retry
from geofm.store import scrub
from geofm.versioning import git_env, secrets_of

BASE_CONFIG = "config/config.yaml"  # loaded by the Snakefile's `configfile:` directive
PATH_KEYS = (("results_dir",), ("scratch_dir",), ("cache_dir",), ("sample_data", "root"))
# Never let git run anything it finds in a repository's own config or hooks.
SAFE_GIT = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "transfer.fsckObjects=true",
            "-c", "protocol.file.allow=always")  # fmt: skip


class SubmissionError(Exception):
    """The submission cannot run as submitted (final: reported as failed, never retried)."""


class InfraError(Transient):
    """Git or another service is unavailable (the submission goes back to the queue)."""


def git(cwd: Path, *args: str, log: Callable[[str], None], env: dict | None = None, timeout: float = 600,
        input: bytes | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """git with the watcher's environment and every repository-local command switched off."""
    env = git_env(env)
    try:
        done = subprocess.run(["git", *SAFE_GIT, *args], cwd=cwd, env=env, capture_output=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise InfraError(f"git {args[0]} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        err = scrub(done.stderr.decode(errors="replace").strip(), secrets_of(env))
        log(f"git {args[0]} exited with {done.returncode}: {err[-2000:]}")
    return done


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {done.returncode}"


@dataclass
class Mirror:
    """The watcher's own clone of the project (trusted)."""

    path: Path
    remote: str
    log: Callable[[str], None]
    stop: threading.Event
    max_backoff: float = 300.0
    fetch_within: float = 1800.0  # give up (requeue) after this long without reaching the remote

    def git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return git(self.path, *args, log=self.log, **kw)

    def fetch_once(self, branch: str) -> str:
        """Fetch origin/<branch> once; its tip, InfraError while the remote is unreachable."""
        ref = f"refs/remotes/{self.remote}/{branch}"
        done = self.git("fetch", "--quiet", "--no-tags", self.remote, f"+refs/heads/{branch}:{ref}")
        if done.returncode == 0:
            return self.rev(ref)
        if b"couldn't find remote ref" in done.stderr:
            raise SubmissionError(f"branch {branch!r} does not exist on {self.remote}")
        raise InfraError(f"git fetch from {self.remote} failed: {scrub(_last_line(done))}")

    def fetch(self, branch: str) -> str:
        """fetch_once, retried with backoff while the remote is unreachable (until `stop`)."""
        return retry(lambda: self.fetch_once(branch), what=f"git fetch {branch}", log=self.log, on=(InfraError,),
                     stop=self.stop, first=2.0, cap=self.max_backoff, within=self.fetch_within)  # fmt: skip

    def rev(self, ref: str) -> str:
        done = self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if done.returncode != 0:
            raise InfraError(f"{ref} is not in the watcher's clone")
        return done.stdout.decode().strip()

    def require_ancestor(self, commit: str, branch: str, tip: str) -> None:
        if self.git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            raise SubmissionError(
                f"commit {commit} is not on {self.remote}/{branch}: only pushed, reviewed commits run"
            )
        done = self.git("merge-base", "--is-ancestor", commit, tip)
        if done.returncode == 1:
            raise SubmissionError(
                f"commit {commit} is not an ancestor of {self.remote}/{branch} ({tip[:10]}): only commits "
                "on the submitted branch run"
            )
        if done.returncode != 0:
            raise InfraError(f"git merge-base failed: {_last_line(done)}")

    def show(self, commit: str, path: str, max_bytes: int) -> bytes | None:
        """A committed file's bytes, None when absent; SubmissionError when larger than max_bytes."""
        spec = f"{commit}:{path}"
        size = self.git("cat-file", "-s", spec)
        if size.returncode != 0:
            return None
        if int(size.stdout.decode().strip() or 0) > max_bytes:
            raise SubmissionError(f"{path}: larger than the {max_bytes} bytes accepted for a config")
        return self.git("cat-file", "blob", spec).stdout

    def top_level(self, commit: str) -> set[str]:
        return set(self.git("ls-tree", "--name-only", commit).stdout.decode().split("\n")) - {""}


def make_checkout(mirror: Mirror, dest: Path, commit: str, branch: str, tip: str) -> bool:
    """A fresh checkout of `commit` in `dest` (False: resumed an existing one at that commit)."""
    head = dest / ".git" / "HEAD"
    try:  # read the file, not `git rev-parse`: no git runs in a checkout a run has written to
        if head.read_text().strip() == commit:
            mirror.log(f"resuming in {dest}")
            return False
    except OSError:
        pass
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    log = mirror.log
    steps = (
        ("init", "--quiet", "--template=", "."),
        ("config", "core.hooksPath", "/dev/null"),
        ("fetch", "--quiet", "--no-tags", f"file://{mirror.path.resolve()}", commit, tip),
        ("update-ref", f"refs/remotes/{mirror.remote}/{branch}", tip),  # the version rule builds on it
        ("checkout", "--quiet", "--detach", commit),
    )
    for args in steps:
        done = git(dest, *args, log=log)
        if done.returncode != 0:
            raise InfraError(f"preparing the checkout failed at git {args[0]}: {_last_line(done)}")
    return True


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged recursively (how Snakemake combines config files)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def path_problem(config: dict) -> str | None:
    """Why a submitted config's output paths would leave the run's folder (None if they do not)."""
    for keys in PATH_KEYS:
        value = config
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is None:
            continue
        key = ".".join(keys)
        if not isinstance(value, str) or not value:
            return f"{key}: must be a relative folder name; fix: remove it to use the default"
        p = PurePosixPath(value)
        if p.is_absolute() or ".." in p.parts or "\\" in value or value.startswith("~"):
            return (
                f"{key}: {value!r} leaves the run's folder; fix: use a relative path without '..' "
                "(shared scratch and caches are the watcher operator's settings)"
            )
    return None


def overlap_problem(config: dict, tracked: set[str]) -> str | None:
    """Why an output folder would overlap the commit's own files (a results commit would
    replace them), or None. `tracked`: the commit's top-level entries."""
    outputs = (
        ("results_dir", PurePosixPath(config["results_dir"]) / config["experiment"]),
        ("scratch_dir", PurePosixPath(config["scratch_dir"]) / config["experiment"]),
        ("cache_dir", PurePosixPath(config["cache_dir"])),
        ("sample_data.root", PurePosixPath(config["sample_data"]["root"])),
    )
    protected = (tracked | set(experiment_config.ALWAYS_PROTECTED)) - set(experiment_config.OUTPUT_ENTRIES)
    for key, path in outputs:
        if path.is_absolute():
            continue  # the operator's shared folders
        parts = [p for p in path.parts if p != "."]
        if not parts or parts[0] in protected:
            return (
                f"{key}: {str(path)!r} overlaps the workflow's own files; fix: keep outputs under "
                f"{', '.join(e + '/' for e in experiment_config.OUTPUT_ENTRIES)}"
            )
    return None


@dataclass
class Operator:
    """The operator's settings that win over a submitted config."""

    max_cells: int = experiment_config.MAX_CELLS
    scratch_root: Path | None = None  # absolute: checkpoints go to <scratch_root>/<id>/<experiment>
    cache_root: Path | None = None  # absolute: shared weights, registry and sample data


def effective_config(mirror: Mirror, checkout: Path, *, sid: str, commit: str, branch: str, config_path: str,
                     uploaded: bytes, operator: Operator) -> tuple[dict, dict]:  # fmt: skip
    """(the config Snakemake will run: plain data, validated; its resolved form), or SubmissionError."""
    limit = experiment_config.MAX_CONFIG_BYTES
    committed = mirror.show(commit, config_path, limit)
    if committed is None:
        raise SubmissionError(f"{config_path} does not exist in commit {commit}")
    if committed != uploaded:
        raise SubmissionError(f"the uploaded config differs from {config_path} in commit {commit}")
    try:
        submitted = experiment_config.parse_untrusted(uploaded, config_path)
        base = {}
        if config_path != BASE_CONFIG:
            found = mirror.show(commit, BASE_CONFIG, limit)
            base = experiment_config.parse_untrusted(found, BASE_CONFIG) if found is not None else {}
    except experiment_config.ConfigError as e:
        raise SubmissionError(f"config error: {e}") from None
    merged = merge(base, submitted)
    problem = path_problem(merged)
    if problem:
        raise SubmissionError(f"config error: {problem}")
    user = merged.get("versioning") if isinstance(merged.get("versioning"), dict) else {}
    ours = {"enabled": True, "branch": branch, "config_commit": commit, "submission": sid, "git_remote": "origin"}
    merged["versioning"] = {**user, **ours}
    if operator.scratch_root:
        merged["scratch_dir"] = str(operator.scratch_root / sid)
    if operator.cache_root:
        merged["cache_dir"] = str(operator.cache_root)
        merged["sample_data"] = {**(merged.get("sample_data") or {}), "root": str(operator.cache_root / "sample_data")}
    try:
        resolved = experiment_config.resolve(copy.deepcopy(merged), checkout, max_cells=operator.max_cells)
    except experiment_config.ConfigError as e:
        raise SubmissionError(f"config error: {e}") from None
    problem = overlap_problem(resolved, mirror.top_level(commit))
    if problem:
        raise SubmissionError(f"config error: {problem}")
    if not names.valid(names.RELATIVE_PATH, f"{resolved['results_dir']}/{resolved['experiment']}"):
        raise SubmissionError(f"config error: results_dir: {names.short(resolved['results_dir'])} is not a plain "
                              "relative folder; fix: use the default (results)")  # fmt: skip
    return merged, resolved
