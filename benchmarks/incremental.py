#!/usr/bin/env python3
"""Redo only what changed: the jobs `snakemake --dry-run` plans after each kind of change to a
finished 2 models x 3 tasks x 1 seed experiment (1 epoch):
a failed cell fixed (a corrupt landslide test chip restored), one model's hyperparameter
changed, plotting settings changed.

    .venv/bin/python benchmarks/incremental.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import job_counts, snakemake, write_config

from geofm import sample_data

MODELS = {
    "a": {"backbone": "prithvi_eo_tiny"},
    "b": {"backbone": "prithvi_eo_tiny", "overrides": {"weight_decay": 0.3}},
}
QUICK = {"overrides": {"max_epochs": 1, "batch_size": 4}}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="geofm-incr-") as tmp:
        folder = Path(tmp)
        data = folder / "landslide"
        sample_data.write("landslide", data, seed=0)
        victim = sorted((data / "images" / "test").glob("*.h5"))[-1]
        good = victim.read_bytes()
        victim.write_bytes(good[:100])
        tasks = {"crop": QUICK, "landslide": {**QUICK, "data_root": str(data)}, "biomass": QUICK}
        base = write_config(
            folder / "base.yaml", experiment="incr", models=MODELS, predictions={"samples": 1}, tasks=tasks
        )
        out, seconds = snakemake(folder, base, "--cores", "2")
        print(f"first run with a corrupt landslide chip: exit {out.returncode} after {seconds:.0f} s")
        victim.write_bytes(good)
        plan, _ = snakemake(folder, base, "--dry-run")
        results = [("failed cells fixed (2 landslide cells)", job_counts(plan.stdout))]
        done, seconds = snakemake(folder, base, "--cores", "2")
        print(f"re-run after the fix: exit {done.returncode} after {seconds:.0f} s")
        changed = {**MODELS, "b": {**MODELS["b"], "overrides": {"weight_decay": 0.3, "lr": 2e-4}}}
        model_b = write_config(
            folder / "model.yaml", experiment="incr", models=changed, predictions={"samples": 1}, tasks=tasks
        )
        plots = write_config(
            folder / "plots.yaml", experiment="incr", models=MODELS, predictions={"samples": 2}, tasks=tasks
        )
        for name, config in (("model b's learning rate changed", model_b), ("plot settings changed", plots)):
            plan, _ = snakemake(folder, config, "--dry-run")
            results.append((name, job_counts(plan.stdout)))
    for name, counts in results:
        total = counts.pop("total", 0)
        print(f"\n{name}: {total} jobs")
        for rule, n in sorted(counts.items()):
            print(f"  {rule:<20}{n:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
