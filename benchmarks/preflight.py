#!/usr/bin/env python3
"""Preflight: time from start until a deliberately broken test-set augmentation is reported
(its err/ file appears), with preflight on versus off, on the default sample-data experiment.

    .venv/bin/python benchmarks/preflight.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SNAKEMAKE, warn_if_slurm_client_without_controller, write_config

BROKEN = [
    {"class_path": "terratorch.datasets.transforms.FlattenTemporalIntoChannels"},
    {"class_path": "albumentations.CenterCrop", "init_args": {"height": 256, "width": 256}},
    {"class_path": "albumentations.pytorch.transforms.ToTensorV2"},
    {"class_path": "terratorch.datasets.transforms.UnflattenTemporalFromChannels", "init_args": {"n_timesteps": 3}},
]


def time_to_error(preflight: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="geofm-preflight-") as tmp:
        folder = Path(tmp)
        config = write_config(folder / "c.yaml", preflight=preflight)
        import yaml

        data = yaml.safe_load(config.read_text())
        data["tasks"]["crop"]["overrides"]["set"] = {"data.init_args.test_transform": BROKEN}
        config.write_text(yaml.safe_dump(data))
        err = folder / "results" / "sample" / "err" / "crop_tiny_seed0.err"
        cmd = [
            SNAKEMAKE,
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(folder),
            "--configfile",
            str(config),
            "--cores",
            "2",
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reported = None
        while proc.poll() is None:
            if reported is None and err.exists():
                reported = time.perf_counter() - t0
            time.sleep(0.5)
        total = time.perf_counter() - t0
        if reported is None and err.exists():
            reported = total
        return reported, total


def main() -> int:
    warn_if_slurm_client_without_controller()
    print(f"{'preflight':<11}{'error reported after s':>24}{'run ended after s':>20}")
    for preflight in (True, False):
        reported, total = time_to_error(preflight)
        print(f"{str(preflight):<11}{reported:>24.1f}{total:>20.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
