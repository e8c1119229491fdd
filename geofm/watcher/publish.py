"""Publishing a run's results: trusted code, the watcher's credentials, nothing taken on trust.

The version rule (submitted code, no credentials) left a results commit at
`refs/geofm/results` in the run's checkout and the DVC objects in the checkout's
`.dvc/cache`. The watcher

1. fetches that commit into its own clone over `file://` (no git command runs inside the
   checkout) with `transfer.fsckObjects`;
2. checks it: one parent, the branch tip it was built on; it changes only
   `results/<experiment>/`, only as plain files (no symlinks, submodules, .gitattributes),
   its message carries the `Geofm-Results`/`Submission` trailers, and its new blobs stay
   under a size cap;
3. pushes the DVC objects its `.dvc` files name, from a staging folder whose DVC config is
   the operator's (remote URL, endpoint, the DVC key): the checkout's `.dvc/config` is never
   used with the watcher's keys. Each object is copied from the checkout's cache without
   following symbolic links and its MD5 checked, so a run cannot make the watcher upload
   any other file;
4. pushes the commit; when the branch moved meanwhile, lays the experiment folder onto the
   new tip (a new commit whose only parent is that tip). A push therefore adds exactly one
   commit to the branch. A commit of this submission already on the branch (a publish
   interrupted after its push) is found by its `Submission:` trailer and not pushed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from geofm import names
from geofm.retry import retry
from geofm.versioning import RESULTS_REF, RESULTS_TRAILER, dvc_executable, identity
from geofm.watcher.checkout import InfraError, Mirror, SubmissionError, _last_line

HASH = re.compile(r"[0-9a-f]{32}(?:\.dir)?")
MAX_DVC_FILE = 64 * 1024
MAX_DIR_MANIFEST = 64 * 1024 * 1024
PLAIN_MODES = ("100644", "100755")


@dataclass
class DvcRemote:
    """The operator's DVC remote and the key that writes it (never the checkout's config)."""

    url: str
    endpoint: str | None = None
    credentials: dict | None = None  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the DVC remote

    def config(self) -> str:
        lines = [
            "[core]",
            "    no_scm = True",
            "    remote = storage",
            "['remote \"storage\"']",
            f"    url = {self.url}",
        ]
        if self.endpoint:
            lines.append(f"    endpointurl = {self.endpoint}")
        return "\n".join(lines) + "\n"


def copy_verified(src: Path, dest: Path, md5: str) -> None:
    """Copy one DVC object, refusing symbolic links and content that does not hash to `md5`."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SubmissionError(f"DVC object {md5} is missing from the run's cache") from None
    except OSError as e:
        raise SubmissionError(f"DVC object {md5} is not a plain file in the run's cache ({e.strerror})") from None
    digest = hashlib.md5(usedforsecurity=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(fd, "rb") as f, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as out:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SubmissionError(f"DVC object {md5} is not a plain file in the run's cache")
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != md5.removesuffix(".dir"):
        os.unlink(out.name)
        raise SubmissionError(f"DVC object {md5} in the run's cache does not match its hash")
    os.replace(out.name, dest)


class Publisher:
    def __init__(self, mirror: Mirror, dvc: DvcRemote, *, log: Callable[[str], None], stop: threading.Event,
                 max_backoff: float = 300.0, push_within: float = 600.0, max_git_bytes: int = 64 << 20):  # fmt: skip
        self.mirror, self.dvc, self.log, self.stop = mirror, dvc, log, stop
        self.max_backoff, self.push_within, self.max_git_bytes = max_backoff, push_within, max_git_bytes

    # 1 + 2 ---------------------------------------------------------------------------------
    def fetch(self, checkout: Path, sid: str) -> str:
        ref = f"refs/geofm/incoming/{sid}"
        # The checkout may belong to the run's own user (--run-as): upload-pack serves it anyway.
        done = self.mirror.git("fetch", "--quiet", "--no-tags", "--upload-pack=git -c 'safe.directory=*' upload-pack",
                               f"file://{checkout.resolve()}", f"+{RESULTS_REF}:{ref}")  # fmt: skip
        if done.returncode != 0:
            raise SubmissionError(f"the run left no results commit ({_last_line(done)})")
        return self.mirror.rev(ref)

    def check(self, commit: str, base: str, exp_rel: str, experiment: str, sid: str) -> None:
        git = self.mirror.git
        parents = git("rev-list", "--parents", "-n", "1", commit).stdout.decode().split()[1:]
        if parents != [base]:
            raise SubmissionError(f"results commit {commit[:10]} is not built on the branch tip {base[:10]}")
        raw = git("diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", base, commit).stdout.decode()
        fields = raw.split("\0")
        total = 0
        for meta, path in zip(fields[0::2], fields[1::2]):
            if not meta:
                continue
            _, new_mode, _, new_blob, status = meta.lstrip(":").split(" ")
            if not path.startswith(exp_rel + "/"):
                raise SubmissionError(f"results commit {commit[:10]} changes {path!r}, outside {exp_rel}/")
            if status != "D" and (new_mode not in PLAIN_MODES or Path(path).name in (".gitattributes", ".gitmodules")):
                raise SubmissionError(f"results commit {commit[:10]}: {path!r} is not a plain results file")
            if status != "D":
                total += int(git("cat-file", "-s", new_blob).stdout.decode().strip() or 0)
        if total > self.max_git_bytes:
            raise SubmissionError(f"results commit {commit[:10]} adds {total} bytes to git, over {self.max_git_bytes}")
        message = git("log", "-1", "--format=%B", commit).stdout.decode()
        if f"{RESULTS_TRAILER}: {experiment}\n" not in message or f"Submission: {sid}\n" not in message:
            raise SubmissionError(f"results commit {commit[:10]} lacks its {RESULTS_TRAILER}/Submission trailers")

    # 3 ------------------------------------------------------------------------------------
    def dvc_objects(self, commit: str, exp_rel: str) -> dict[str, bytes]:
        """The .dvc files of the experiment folder in `commit`: {path: content}."""
        listed = self.mirror.git("ls-tree", "-r", "-z", "--name-only", commit, "--", exp_rel).stdout.decode()
        found = {}
        for path in filter(None, listed.split("\0")):
            if path.endswith(".dvc"):
                found[path] = self.mirror.show(commit, path, MAX_DVC_FILE) or b""
        return found

    def push_dvc(self, commit: str, exp_rel: str, checkout: Path, staging: Path) -> int:
        dvc_files = self.dvc_objects(commit, exp_rel)
        if not dvc_files:
            return 0
        if staging.exists():
            shutil.rmtree(staging)
        (staging / ".dvc").mkdir(parents=True)
        (staging / ".dvc" / "config").write_text(self.dvc.config())
        source, cache = checkout / ".dvc" / "cache" / "files" / "md5", staging / ".dvc" / "cache" / "files" / "md5"
        count = 0
        for path, text in dvc_files.items():
            try:
                outs = yaml.safe_load(text)["outs"]
                hashes = [o["md5"] for o in outs if o.get("hash") == "md5"]
            except (yaml.YAMLError, TypeError, KeyError) as e:
                raise SubmissionError(f"{path}: not a DVC 3 file ({type(e).__name__})") from None
            if len(hashes) != len(outs) or not all(names.valid(HASH, h) for h in hashes):
                raise SubmissionError(f"{path}: outputs without an MD5 (DVC 3) hash")
            for h in hashes:
                copy_verified(source / h[:2] / h[2:], cache / h[:2] / h[2:], h)
                count += 1
                if h.endswith(".dir"):
                    count += self._dir_entries(source, cache, h)
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            (staging / path).write_bytes(text)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(staging), **(self.dvc.credentials or {})}

        def once() -> None:
            result = _run([dvc_executable(), "push", "--quiet", *dvc_files], staging, env)
            if result[0] != 0:
                raise InfraError(f"dvc push failed: {result[1]}")

        retry(once, what="dvc push", log=self.log, on=(InfraError,), stop=self.stop, first=2.0, cap=self.max_backoff,
              within=self.push_within)  # fmt: skip
        return count

    def _dir_entries(self, source: Path, cache: Path, h: str) -> int:
        manifest = cache / h[:2] / h[2:]
        if manifest.stat().st_size > MAX_DIR_MANIFEST:
            raise SubmissionError(f"DVC directory manifest {h} is too large")
        try:
            entries = json.loads(manifest.read_bytes())
            hashes = [e["md5"] for e in entries]
        except (ValueError, TypeError, KeyError):
            raise SubmissionError(f"DVC directory manifest {h} is not a list of files") from None
        for e in hashes:
            if not names.valid(HASH, e) or e.endswith(".dir"):
                raise SubmissionError(f"DVC directory manifest {h} names {names.short(e)}")
            copy_verified(source / e[:2] / e[2:], cache / e[:2] / e[2:], e)
        return len(hashes)

    # 4 ------------------------------------------------------------------------------------
    def already_pushed(self, tip: str, sid: str) -> str | None:
        found = self.mirror.git("log", "-n", "1", "--format=%H", "-F", f"--grep=Submission: {sid}", tip)
        sha = found.stdout.decode().strip()
        return sha if names.valid(names.COMMIT, sha) else None

    def relay(self, commit: str, tip: str, exp_rel: str) -> str:
        """`commit`'s experiment folder on `tip`: a new commit whose only parent is `tip`."""
        git = self.mirror.git
        with tempfile.TemporaryDirectory(prefix="geofm-index-") as tmp:
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            steps = [("read-tree", tip), ("rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", exp_rel)]
            if git("cat-file", "-e", f"{commit}:{exp_rel}").returncode == 0:
                steps.append(("read-tree", f"--prefix={exp_rel}/", f"{commit}:{exp_rel}"))
            for args in steps:
                if git(*args, env=env).returncode != 0:
                    raise InfraError(f"laying the results onto {tip[:10]} failed at git {args[0]}")
            tree = git("write-tree", env=env).stdout.decode().strip()
        message = git("log", "-1", "--format=%B", commit).stdout
        made = git("commit-tree", tree, "-p", tip, "-F", "-", env={**os.environ, **identity()}, input=message)
        if made.returncode != 0:
            raise InfraError(f"git commit-tree failed: {_last_line(made)}")
        return made.stdout.decode().strip()

    def push_git(self, commit: str, base: str, branch: str, exp_rel: str, sid: str,
                 guard: Callable[[], None] = lambda: None) -> str:  # fmt: skip
        """Push the results commit (laid onto the tip if the branch moved); returns what is on the
        branch. `guard()` runs before each push and raises when this watcher may no longer push."""
        remote = self.mirror.remote

        def once() -> str:
            guard()
            tip = self.mirror.fetch_once(branch)
            pushed = self.already_pushed(tip, sid)
            if pushed:
                self.log(f"results of {sid} are already on {remote}/{branch} as {pushed[:10]}")
                return pushed
            candidate = commit
            if tip != base:
                self.log(f"{remote}/{branch} moved to {tip[:10]}; laying the results onto it")
                candidate = self.relay(commit, tip, exp_rel)
            done = self.mirror.git("push", "--porcelain", remote, f"{candidate}:refs/heads/{branch}")
            if done.returncode != 0:
                raise InfraError(f"git push to {remote}/{branch} failed: {_last_line(done)}")
            return candidate

        return retry(once, what="git push", log=self.log, on=(InfraError,), stop=self.stop, first=2.0,
                     cap=self.max_backoff, within=self.push_within)  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        return 124, f"{cmd[0]} timed out"
    out = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, out[-1][:300] if out else f"exit status {done.returncode}"
