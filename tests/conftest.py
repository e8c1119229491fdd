"""Shared fixtures: run the real workflow in throwaway folders, once per session where possible."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def run_snakemake(
    workdir: Path,
    *args: str,
    config: dict | None = None,
    configfile: Path = DEFAULT_CONFIG,
    timeout: int = 900,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """The workflow CLI as a user calls it, in `workdir`, with a hard timeout."""
    cmd = ["timeout", "-k", "20", str(timeout), SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(configfile), *args]
    if config:
        cmd += ["--config", *[f"{k}={json.dumps(v)}" for k, v in config.items()]]
    full_env = {**os.environ, "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=workdir)


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    counts = {}
    block = output.split("Job stats:", 1)[-1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            if counts:
                break
            continue
        counts[m.group(1)] = int(m.group(2))
    return counts


def write_config(path: Path, **changes) -> Path:
    """The default config with top-level keys replaced."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One TerraTorch registry snapshot for the whole session (taking it costs ~10 s)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, shared_cache):
    """The README's main job: the default config on the sample data, run once per session."""
    workdir = tmp_path_factory.mktemp("default_run")
    result = run_snakemake(workdir, "--cores", "2", config={"cache_dir": str(shared_cache)}, timeout=1200)
    return workdir, result


CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "num_workers": 0, "pin_memory": False,
       "persistent_workers": False, "prefetch_factor": 2, "tf32": False}  # fmt: skip


def render_for_sample(task, recipe_text: str, data: Path, work: Path, cache: Path, **task_settings) -> Path:
    """A recipe rendered for one task's data as the finetune rule does (CPU, 1 epoch,
    batch 2), with the task's hold-out lists written; returns the config file."""
    from geofm import config as experiment_config
    from geofm import render
    from geofm.tasks import TASKS
    from geofm.tasks.base import write_split_lists

    raw = {"tasks": {t: {"enabled": t == task.name} for t in TASKS}, "cache_dir": str(cache)}
    raw["tasks"][task.name].update(data_root=str(data), overrides={"max_epochs": 1, "batch_size": 2}, **task_settings)
    experiment = experiment_config.resolve(raw, root=REPO)
    splits = work / "splits"
    if task.holdout:
        write_split_lists(task.holdout_split(data), splits)
    settings = experiment_config.cell_settings(experiment, task.name, "tiny", 0)
    paths = {"data_root": str(data), "run_dir": str(work / "run"), "splits_dir": str(splits), "ckpt_path": None}
    config = render.render(recipe_text, {**settings, "trainer": CPU}, paths)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
