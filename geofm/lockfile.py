"""The locked environment (uv.lock): its hash, how the running environment differs from it, and
the conda view of it (envs/geofm.yaml).

    python -m geofm.lockfile            # rewrite envs/geofm.yaml from uv.lock
    python -m geofm.lockfile --check    # exit 1 when envs/geofm.yaml differs from what uv.lock gives
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "uv.lock"
CONDA_ENV = ROOT / "envs" / "geofm.yaml"
# Installed by the tools that build an environment, never by the lock.
INSTALLERS = {"pip", "setuptools", "wheel", "uv"}
LINUX = " ; sys_platform == 'linux'"


def locked_versions(lock: Path = LOCK) -> dict[str, set[str] | None]:
    """Every package the lock pins (canonical name -> versions); the project itself maps to None."""
    versions: dict[str, set[str] | None] = {}
    for package in tomllib.loads(Path(lock).read_text())["package"]:
        name = canonicalize_name(package["name"])
        if "registry" in package.get("source", {}):
            versions.setdefault(name, set()).add(package["version"])
        else:  # the project (editable): its version is the code's commit, which the manifest records
            versions[name] = None
    return versions


def installed_versions() -> dict[str, str]:
    """Installed distributions (canonical name -> version), the first on sys.path winning, as for
    imports. Reads only the metadata headers: parsing whole METADATA files takes ~10x longer."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        head = (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").partition("\n\n")[0]
        fields = dict(re.findall(r"^(Name|Version): *(.*?)\s*$", head, re.MULTILINE))
        if "Name" in fields and "Version" in fields:
            versions.setdefault(canonicalize_name(fields["Name"]), fields["Version"])
    return versions


def _same(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def lock_status(lock: Path = LOCK, installed: dict[str, str] | None = None) -> dict:
    """The lock's sha256; `drift`: each installed package whose version differs from the lock
    (name, locked, installed); `unlocked`: installed packages the lock does not know (a profiler
    added by hand, say), name -> version. Locked packages that are not installed (the test tools in
    a runtime set-up) are neither."""
    lock = Path(lock)
    if not lock.is_file():
        return {"sha256": None, "drift": [], "unlocked": {}}
    locked = locked_versions(lock)
    installed = installed_versions() if installed is None else installed
    drift = [
        {"name": name, "locked": " or ".join(sorted(locked[name])), "installed": version}
        for name, version in sorted(installed.items())
        if locked.get(name) and not any(_same(version, v) for v in locked[name])
    ]
    unlocked = {name: v for name, v in sorted(installed.items()) if name not in locked and name not in INSTALLERS}
    return {"sha256": hashlib.sha256(lock.read_bytes()).hexdigest(), "drift": drift, "unlocked": unlocked}


def conda_env(root: Path = ROOT) -> str:
    """envs/geofm.yaml: the lock's runtime closure (no test tools), version-exact, for `--sdm conda`."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv") or "uv"
    export = subprocess.run(
        [uv, "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header", "--no-annotate"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    allowed = SpecifierSet(tomllib.loads((Path(root) / "uv.lock").read_text())["requires-python"])
    python = next(f"3.{minor}" for minor in range(8, 40) if f"3.{minor}" in allowed)
    lines = [
        "# Written by `python -m geofm.lockfile` from uv.lock; do not edit (tests/test_envs.py fails when it drifts).",
        "# The rules' software for `snakemake --sdm conda` (Linux): the locked runtime dependencies, version-exact.",
        "# The default set-up (bootstrap.sh) installs the same lock into .venv and needs no conda.",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
        # uv.lock is resolved for Linux only: the marker every line carries says nothing here.
        *(f"      - {line.strip().removesuffix(LINUX)}" for line in export.splitlines() if line.strip()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = conda_env()
    if "--check" in argv:
        if CONDA_ENV.read_text() != text:
            print(f"{CONDA_ENV.relative_to(ROOT)} differs from uv.lock: run python -m geofm.lockfile", file=sys.stderr)
            return 1
        return 0
    CONDA_ENV.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
