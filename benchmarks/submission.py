#!/usr/bin/env python3
"""Submission cost on the local SLURM cluster: a grid (default 2 models x 3 tasks x 10 seeds, one
tiny epoch) run through profiles/slurm with job arrays (the profile as written) and without
(--slurm-array-jobs none). Prints, per mode, the number of sbatch calls (counted by a wrapper
put first on PATH), the seconds from start until the last call (everything submitted), and the
total wall time.

Floor (issue 12): at least 5x fewer sbatch calls with arrays, and no slower in total.

    tests/cluster/slurm-up.sh
    .venv/bin/python benchmarks/submission.py [--models 2] [--seeds 10] [--modes arrays,single]
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, job_counts, snakemake, warn_if_slurm_client_without_controller, write_config

SITE = {"GEOFM_SLURM_PARTITION": "debug", "GEOFM_SLURM_ACCOUNT": "geofm", "GEOFM_SLURM_GPUS": "0",
        "GEOFM_SLURM_CPUS": "1"}  # fmt: skip
WRAPPER = """#!/bin/sh
# Counts sbatch calls for benchmarks/submission.py, then runs the real sbatch.
echo "$(date +%s.%N) $*" >> "{log}"
exec {sbatch} "$@"
"""


def grid(folder: Path, models: int, seeds: int) -> Path:
    quick = {"overrides": {"max_epochs": 1, "batch_size": 4}}
    return write_config(
        folder / "config.yaml",
        experiment="grid",
        seeds=list(range(seeds)),
        models={f"m{i}": {"backbone": "prithvi_eo_tiny", "overrides": {"lr": 1e-3 / (i + 1)}} for i in range(models)},
        tasks={"crop": quick, "landslide": quick, "biomass": quick},
        predictions={"samples": 1},
    )


def run(folder: Path, config: Path, arrays: bool, timeout: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    bin_dir, log = folder / "bin", folder / "sbatch-calls.log"
    bin_dir.mkdir()
    real = next(Path(p) / "sbatch" for p in os.environ["PATH"].split(os.pathsep) if (Path(p) / "sbatch").is_file())
    wrapper = bin_dir / "sbatch"
    wrapper.write_text(WRAPPER.format(log=log, sbatch=real))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    os.environ.update(SITE, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = ["--profile", str(REPO / "profiles" / "slurm"), "--set-resources", "finetune:gpu=0", "finetune:mem_mb=3000",
            "evaluate:gpu=0", "evaluate:mem_mb=3000"]  # fmt: skip
    if not arrays:
        args += ["--slurm-array-jobs", "none"]
    start = time.time()
    out, wall = snakemake(folder, config, *args, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{'arrays' if arrays else 'single'} run failed:\n{out.stderr[-3000:]}")
    calls = [float(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []
    counts = job_counts(out.stdout + out.stderr)
    return {
        "sbatch_calls": len(calls),
        "heavy_jobs": counts.get("finetune", 0) + counts.get("evaluate", 0),
        "all_submitted_s": (max(calls) - start) if calls else None,
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--modes", default="arrays,single")
    parser.add_argument("--timeout", type=int, default=7200)
    args = parser.parse_args()
    warn_if_slurm_client_without_controller()
    results = {}
    with tempfile.TemporaryDirectory(prefix="geofm-submission-") as tmp:
        for mode in args.modes.split(","):
            folder = Path(tmp) / mode
            folder.mkdir()
            config = grid(folder, args.models, args.seeds)
            results[mode] = run(folder, config, mode == "arrays", args.timeout)
            print(f"{mode}: {results[mode]}", flush=True)
    print(f"\n{'mode':<8}{'heavy jobs':>12}{'sbatch calls':>14}{'all submitted (s)':>19}{'wall (s)':>10}")
    for mode, r in results.items():
        submitted = f"{r['all_submitted_s']:.0f}" if r["all_submitted_s"] is not None else "-"
        print(f"{mode:<8}{r['heavy_jobs']:>12}{r['sbatch_calls']:>14}{submitted:>19}{r['wall_s']:>10.0f}")
    if {"arrays", "single"} <= set(results):
        a, s = results["arrays"], results["single"]
        print(f"sbatch calls single / arrays: {s['sbatch_calls'] / max(1, a['sbatch_calls']):.1f}x (floor >= 5x); "
              f"wall arrays / single: {a['wall_s'] / s['wall_s']:.2f} (floor <= 1.0)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
