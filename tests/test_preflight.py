"""Preflight: a cell whose test stage is broken fails at the start of its fine-tune job (one
batch of every stage runs first), before any training, with its err/ file; the other cells go on."""

from __future__ import annotations

import csv

import pytest
from conftest import run_snakemake, write_config

pytestmark = pytest.mark.e2e

# A test-set augmentation that only fails at test time: a crop larger than the 224 px chips.
BROKEN_TEST_TRANSFORM = [
    {"class_path": "terratorch.datasets.transforms.FlattenTemporalIntoChannels"},
    {"class_path": "albumentations.CenterCrop", "init_args": {"height": 256, "width": 256}},
    {"class_path": "albumentations.pytorch.transforms.ToTensorV2"},
    {"class_path": "terratorch.datasets.transforms.UnflattenTemporalFromChannels", "init_args": {"n_timesteps": 3}},
]


@pytest.fixture(scope="module")
def preflight_run(tmp_path_factory, shared_cache):
    workdir = tmp_path_factory.mktemp("preflight")
    quick = {"max_epochs": 1, "batch_size": 4}
    config = write_config(
        workdir / "config.yaml",
        experiment="preflight",
        preflight=True,
        seeds=[0, 1],
        predictions={"samples": 1},
        cache_dir=str(shared_cache),
        tasks={
            "crop": {"overrides": {**quick, "set": {"data.init_args.test_transform": BROKEN_TEST_TRANSFORM}}},
            "landslide": {"overrides": quick},
            "biomass": {"overrides": quick},
        },
    )
    return workdir, run_snakemake(workdir, "--cores", "2", configfile=config, timeout=1800)


def test_broken_cell_caught_before_fine_tuning(preflight_run):
    workdir, result = preflight_run
    assert result.returncode != 0
    results = workdir / "results" / "preflight"
    for seed in (0, 1):  # each seed's fine-tune job checks its stages first
        text = (results / "err" / f"crop_tiny_seed{seed}.err").read_text()
        assert "stage: finetune" in text
        cause = next(line for line in text.splitlines() if line.startswith("cause: "))
        assert cause.startswith("cause: PreflightFailed: test stage, first batch: "), cause
        assert "256" in text or "CenterCrop" in text or "larger" in text.lower()
    scratch = workdir / "scratch" / "preflight" / "crop" / "tiny"
    assert not list(scratch.glob("seed*/best.ckpt")) and not list(scratch.glob("seed*/checkpoints/*.ckpt"))
    assert not list(scratch.glob("seed*/logs/metrics.csv")), "no training epoch ran"


def test_other_cells_finish(preflight_run):
    workdir, _ = preflight_run
    out = workdir / "results" / "preflight" / "out"
    for task in ("landslide", "biomass"):
        for seed in (0, 1):
            assert (out / task / "tiny" / f"seed{seed}" / "metrics.json").is_file()
    rows = {(r["task"], r["seed"]): r["status"] for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows[("crop", "0")] == rows[("crop", "1")] == "failed"
    assert rows[("landslide", "1")] == "ok" and rows[("biomass", "0")] == "ok"
