"""Helpers shared by the benchmark scripts: run the workflow CLI in a folder, parse job counts."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def snakemake(folder: Path, config: Path, *args: str, timeout: int = 3600) -> tuple[subprocess.CompletedProcess, float]:
    cmd = ["timeout", "-k", "20", str(timeout), SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(folder)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd + ["--configfile", str(config), *args], capture_output=True, text=True)
    return out, time.perf_counter() - t0


def job_counts(output: str) -> dict[str, int]:
    block = output.split("Job stats:", 1)[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def write_config(path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cache_dir"] = str(REPO / "resources" / "cache")
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def warn_if_slurm_client_without_controller() -> None:
    """With a SLURM client installed but no controller, every snakemake start stalls ~10 s while
    the SLURM plugin probes the cluster: real on such a machine, but not a cost of this workflow."""
    import shutil

    if not shutil.which("scontrol"):
        return
    try:
        up = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        up = False
    if not up:
        print(
            "note: a SLURM client is installed but no controller answers: each snakemake start stalls"
            " ~10 s (start one with tests/cluster/slurm-up.sh, stop it with slurm-down.sh)",
            file=sys.stderr,
        )
