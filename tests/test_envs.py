"""One lock, three views: uv.lock agrees with pyproject.toml, envs/geofm.yaml is written from it,
the running environment is the locked one, and the manifest's drift check reports a difference."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import yaml
from conftest import REPO, VENV_BIN
from packaging.utils import canonicalize_name

from geofm import lockfile

UV = str(VENV_BIN / "uv") if (VENV_BIN / "uv").exists() else shutil.which("uv") or "uv"


def _uv(*args, cwd=REPO):
    return subprocess.run([UV, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_lock_agrees_with_pyproject():
    result = _uv("lock", "--check")  # no network when they agree
    assert result.returncode == 0, f"pyproject.toml and uv.lock disagree: run `uv lock`\n{result.stderr}"


def test_lock_check_fails_when_pyproject_changes(tmp_path):
    shutil.copy(REPO / "uv.lock", tmp_path)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "\ndependencies = [\n" in pyproject
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace("\ndependencies = [\n", '\ndependencies = [\n    "six",\n')
    )
    assert _uv("lock", "--check", "--offline", cwd=tmp_path).returncode != 0


def test_lock_is_pypi_only():
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    for package in lock["package"]:
        source = package["source"]
        assert source in ({"registry": "https://pypi.org/simple"}, {"editable": "."}), (package["name"], source)
        for dist in [package.get("sdist", {}), *package.get("wheels", [])]:
            assert dist.get("url", "https://files.pythonhosted.org/").startswith("https://files.pythonhosted.org/")
    # No local package source (a machine's mirror) is written anywhere in the repository.
    found = subprocess.run(["git", "grep", "-n", "file:" + "///"], cwd=REPO, capture_output=True, text=True)
    assert found.stdout == "", found.stdout


def test_conda_env_is_written_from_the_lock():
    text = (REPO / "envs" / "geofm.yaml").read_text()
    assert text == lockfile.conda_env(), "envs/geofm.yaml differs from uv.lock: run python -m geofm.lockfile"
    pip = yaml.safe_load(text)["dependencies"][-1]["pip"]
    locked = lockfile.locked_versions()
    runtime = {}
    for line in pip:
        name, version = line.split(";")[0].strip().split("==")
        runtime[name] = version
        assert {version} == locked[name], line
    assert "pytest" not in runtime and "dvc" in runtime and "dvc-s3" in runtime


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_conda_env_has_every_package_the_rules_import():
    """The rules run scripts/ with the geofm package on PYTHONPATH: every third-party module
    they import must come from a distribution in envs/geofm.yaml."""
    modules = set().union(*(_imports(p) for p in [*REPO.glob("scripts/*.py"), *REPO.glob("geofm/**/*.py")]))
    modules -= set(sys.stdlib_module_names) | {"geofm"}
    providers = metadata.packages_distributions()
    env = {
        line.split("==")[0]
        for line in yaml.safe_load((REPO / "envs" / "geofm.yaml").read_text())["dependencies"][-1]["pip"]
    }
    missing = {m: providers.get(m) for m in modules if not {canonicalize_name(d) for d in providers.get(m, [])} & env}
    assert not missing, f"imported by the rules but not in envs/geofm.yaml: {missing}"
    assert {"torch", "terratorch", "dvc", "h5py", "rasterio", "matplotlib", "nvidia-ml-py", "optuna"} <= env


def test_installed_environment_is_the_locked_one():
    status = lockfile.lock_status()
    assert len(status["sha256"]) == 64
    assert status["drift"] == [], "installed versions differ from uv.lock: run ./bootstrap.sh dev"


def test_drift_names_a_package_whose_version_differs_from_the_lock(tmp_path):
    text = (REPO / "uv.lock").read_text()
    numpy = metadata.version("numpy")
    entry = f'name = "numpy"\nversion = "{numpy}"'
    assert entry in text
    (tmp_path / "uv.lock").write_text(text.replace(entry, 'name = "numpy"\nversion = "1.0.0"'))
    status = lockfile.lock_status(tmp_path / "uv.lock")
    assert status["drift"] == [{"name": "numpy", "locked": "1.0.0", "installed": numpy}]
    assert status["sha256"] != lockfile.lock_status()["sha256"]
    # A package the lock does not know is listed apart; the tools that build an environment are not.
    installed = {"numpy": numpy, "not-in-the-lock": "0.1", "pip": "25.0", "geofm-pipeline": "0.0.0"}
    status = lockfile.lock_status(installed=installed)
    assert status["drift"] == [] and status["unlocked"] == {"not-in-the-lock": "0.1"}


def test_readme_names_the_locked_versions():
    section = (REPO / "README.md").read_text().split("### Set-up: one lock, three views", 1)[1].split("\n## ", 1)[0]
    pins = re.findall(r"\| ([a-z][a-z0-9-]*) \| (\d[\w.]*) \|", section)
    assert len(pins) >= 13
    locked = lockfile.locked_versions()
    assert [(name, version) for name, version in pins if locked.get(name) != {version}] == []
