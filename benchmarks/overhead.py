#!/usr/bin/env python3
"""Workflow overhead: the default sample-data experiment through the workflow versus the same
fine-tunes and evaluations called directly with `terratorch fit` / `terratorch test` on the
identical configs (the workflow's own config.effective.yaml files), 2 at a time with one torch
thread each, like the workflow's jobs on 2 cores. Runs are interleaved; the median ratio is reported.

Both sides start from already generated sample data. The workflow also runs its preflight
(unless --no-preflight), baselines, plots, manifests and aggregation: that is the overhead.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--no-preflight]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import snakemake, warn_if_slurm_client_without_controller, write_config

from geofm import sample_data

TERRATORCH = str(Path(sys.executable).parent / "terratorch")


def direct(configs: list[Path], folder: Path) -> float:
    """fit then test per cell, two cells at a time; returns wall seconds."""

    # One torch thread per process, as the workflow gives each of its 1-thread jobs.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cell(config: Path) -> None:
        run = folder / config.parent.name
        common = ["--config", str(config), f"--trainer.default_root_dir={run}"]
        subprocess.run([TERRATORCH, "fit", *common], check=True, capture_output=True, env=env)
        ckpt = next(Path(p) for p in sorted((Path(config).parent / "checkpoints").glob("*.ckpt")))
        subprocess.run([TERRATORCH, "test", *common, f"--ckpt_path={ckpt}"], check=True, capture_output=True, env=env)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(cell, configs))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-preflight", action="store_true")
    args = parser.parse_args()
    warn_if_slurm_client_without_controller()
    with tempfile.TemporaryDirectory(prefix="geofm-overhead-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        for task in ("crop", "landslide", "biomass"):
            sample_data.write(task, data / task, seed=0)
        ratios, wf_times, direct_times = [], [], []
        for i in range(args.repeats):
            folder = tmp / f"wf{i}"
            folder.mkdir()
            import yaml

            config = write_config(folder / "c.yaml", preflight=not args.no_preflight)
            settings = yaml.safe_load(config.read_text())
            for task in settings["tasks"]:
                settings["tasks"][task]["data_root"] = str(data / task)
            config.write_text(yaml.safe_dump(settings))
            out, wf = snakemake(folder, config, "--cores", "2")
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            # The same work, directly: copy each cell's effective config next to its own run folder.
            configs = []
            for effective in sorted((folder / "results" / "sample" / "out").glob("*/*/seed*/config.effective.yaml")):
                run = tmp / f"direct{i}" / effective.parts[-4]
                run.mkdir(parents=True)
                text = effective.read_text().replace(
                    str(folder / "scratch" / "sample" / effective.parts[-4] / "tiny" / "seed0"), str(run)
                )
                (run / "config.yaml").write_text(text)
                configs.append(run / "config.yaml")
            d = direct(configs, tmp)
            wf_times.append(wf)
            direct_times.append(d)
            ratios.append(wf / d)
            print(f"run {i + 1}: workflow {wf:.1f} s, direct terratorch {d:.1f} s, ratio {wf / d:.3f}", flush=True)
            shutil.rmtree(folder / "scratch", ignore_errors=True)
    print(f"\nmedian: workflow {statistics.median(wf_times):.1f} s, direct {statistics.median(direct_times):.1f} s, "
          f"ratio {statistics.median(ratios):.3f} (floor: <= 1.15; preflight {'off' if args.no_preflight else 'on'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
