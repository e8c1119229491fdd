"""The default workflow on the sample data, end to end: assertions on the content of its outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from PIL import Image

from geofm.tasks import TASKS

pytestmark = pytest.mark.e2e
CELLS = [(task, "tiny", 0) for task in ("crop", "landslide", "biomass")]


@pytest.fixture(scope="module")
def results(default_run):
    workdir, result = default_run
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir / "results" / "sample"


def cell_dir(results, task, model, seed):
    return results / "out" / task / model / f"seed{seed}"


@pytest.mark.parametrize("task,model,seed", CELLS)
def test_metrics_present_in_range_and_beat_baseline(results, task, model, seed):
    metrics = json.loads((cell_dir(results, task, model, seed) / "metrics.json").read_text())
    baseline = json.loads((results / "out" / "baselines" / f"{task}.json").read_text())
    pinned, logged = metrics["pinned"], metrics["terratorch"]
    spec = TASKS[task]
    for name in TASKS[task].definitions:
        if "<" not in name:
            assert name in pinned, f"{task}: pinned metric {name} missing"
    if spec.kind == "segmentation":
        for name in spec.class_names:  # per-class scores, as TerraTorch logs them too
            assert f"IoU_{name}" in pinned and f"test/IoU_{name}" in logged
        for key in ("mIoU", "mAcc", "pixel_accuracy"):
            assert 0 <= pinned[key] <= 1
        for key in ("test/mIoU", "test/Accuracy", "test/F1_Score", "test/Pixel_Accuracy", "test/Boundary_mIoU"):
            assert 0 <= logged[key] <= 1, key
        # The pinned per-pixel accuracy is TerraTorch's pixel accuracy on the same split.
        assert pinned["pixel_accuracy"] == pytest.approx(logged["test/Pixel_Accuracy"], abs=1e-4)
        assert pinned[spec.headline] > baseline["pinned"][spec.headline]
    else:
        assert pinned["RMSE"] >= 0 and pinned["MAE"] >= 0 and pinned["R2"] <= 1
        assert pinned["RMSE"] == pytest.approx(logged["test/RMSE"], rel=1e-3)
        assert pinned["MAE"] == pytest.approx(logged["test/MAE"], rel=1e-3)
        assert pinned["RMSE"] < baseline["pinned"]["RMSE"]
    assert metrics["test_chips"] > 0


@pytest.mark.parametrize("task,model,seed", CELLS)
def test_resources_present_and_plausible(results, task, model, seed):
    d = cell_dir(results, task, model, seed)
    finetune = json.loads((d / "finetune.json").read_text())
    evaluate = json.loads((d / "evaluate.json").read_text())
    for report in (finetune, evaluate):
        assert 0 < report["wall_s"] < 600
        assert 0 < report["cpu_s"] < 2 * 600
        assert 200 < report["peak_rss_mb"] < 16000
        assert report["parameters"] > 1_000_000  # prithvi_eo_tiny + UperNet
        assert report["gpu"] is None  # CPU machine: no invented GPU figures
    assert finetune["train_samples"] > 0 and finetune["train_samples_per_s"] > 0
    assert finetune["runtime"]["precision"] == "32-true"  # 'auto' on a CPU
    assert finetune["selection"]["monitor"] in ("val/mIoU", "val/RMSE")
    curves = list(csv.DictReader(open(d / "curves.csv")))
    assert len(curves) == finetune["epochs"] + 1 or len(curves) == finetune["epochs"]
    assert "train/loss" in curves[0] and "val/loss" in curves[0]


@pytest.mark.parametrize("task,model,seed", CELLS)
def test_rendered_config_is_kept_and_honest_about_splits(results, task, model, seed):
    d = cell_dir(results, task, model, seed)
    rendered = yaml.safe_load((d / "config.yaml").read_text())
    effective = yaml.safe_load((d / "config.effective.yaml").read_text())
    assert rendered["model"]["init_args"]["model_args"]["backbone"] == "prithvi_eo_tiny"
    assert effective["seed_everything"] == seed
    if task == "crop":
        data = rendered["data"]["init_args"]
        select = (results / "out" / "splits" / "crop" / "select.txt").read_text().split()
        train = (results / "out" / "splits" / "crop" / "train.txt").read_text().split()
        test = (results / "out" / "splits" / "crop" / "test.txt").read_text().split()
        assert data["val_split"].endswith("select.txt") and data["test_split"].endswith("test.txt")
        assert select and train and test
        assert not set(select) & set(test), "the selection split must never be the reported split"
        assert not set(select) & set(train)
    summary = {
        (r["task"], r["model"], int(r["seed"])): r for r in csv.DictReader(open(results / "out" / "summary.csv"))
    }
    row = summary[(task, model, seed)]
    assert row["test_split"] == TASKS[task].test_split
    assert row["selection_split"] == TASKS[task].selection_split


@pytest.mark.parametrize("task,model,seed", CELLS)
def test_prediction_plots_decodable_with_expected_panels(results, task, model, seed):
    folder = results / "predictions" / task / model / f"seed{seed}"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 2  # predictions.samples in the default config
    panels = {"crop": 5, "landslide": 3, "biomass": 4}[task]  # inputs + truth + prediction (+ error)
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            width, height = im.size
            assert width / height == pytest.approx(panels * 3.2 / 3.6, rel=0.05)
            colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is None or len(colours) > 50, "a blank plot"
    # The same chips for every model and seed of a task (seeded pick).
    assert [p.stem for p in pngs] == sorted(p.stem for p in pngs)


def test_summary_rows_complete(results):
    rows = list(csv.DictReader(open(results / "out" / "summary.csv")))
    assert {(r["task"], r["model"], int(r["seed"])) for r in rows} == set(CELLS)
    for row in rows:
        assert row["status"] == "ok"
        assert row["beats_baseline"] == "True"
        for key in (
            "headline",
            "baseline",
            "finetune_wall_s",
            "evaluate_wall_s",
            "cpu_hours",
            "peak_rss_mb",
            "parameters",
        ):
            assert row[key] not in ("", None) and math.isfinite(float(row[key])), key
    document = json.loads((results / "out" / "summary.json").read_text())
    assert document["failed"] == 0 and document["cells"] == 3
    assert set(document["definitions"]) == {"crop", "landslide", "biomass"}
    assert not (results / "err").exists() or not any((results / "err").iterdir())


def test_every_rule_logged_and_heavy_rules_benchmarked(results):
    logs = results / "logs"
    rules = ("sample_data", "selection_split", "validate_data", "finetune", "evaluate")
    rules += ("plot_predictions", "summarize")
    for rule in rules:
        assert any((logs / rule).iterdir()), rule
    for rule in ("finetune", "evaluate"):
        tsv = sorted((results / "benchmarks" / rule).glob("*.tsv"))
        assert tsv and "max_rss" in tsv[0].read_text()


def test_rerun_does_nothing(default_run, shared_cache):
    from conftest import job_counts, run_snakemake

    workdir, _ = default_run
    result = run_snakemake(workdir, "--dry-run", config={"cache_dir": str(shared_cache)})
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr or not job_counts(result.stdout)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_rerun_trains_on_the_same_augmented_batches_staged_or_not(results, workers, tmp_path):
    """Albumentations (TerraTorch's augmentations) draws from its own generators, which
    seed_everything does not reach: unseeded, the crop flips differ between runs of a cell.
    With trainer.stage_data the split is decoded once into arrays: the same batches again."""
    import torch

    from geofm.training import build_cli, runtime_settings

    config = cell_dir(results, "crop", "tiny", 0) / "config.effective.yaml"
    trainer = {"accelerator": "cpu", "precision": "32-true", "num_workers": workers, "pin_memory": False,
               "persistent_workers": True, "prefetch_factor": 2, "tf32": False}  # fmt: skip

    def three_epochs_of_batches(job=None):
        cli = build_cli(config, runtime_settings(trainer, threads=1 + workers), job=job)
        cli.datamodule.setup("fit")
        loader = cli.datamodule.train_dataloader()
        return [batch["image"].clone() for _ in range(3) for batch in loader]

    first, second = three_epochs_of_batches(), three_epochs_of_batches()
    staged = three_epochs_of_batches({"stage_dir": str(tmp_path / "staged"), "data_manifest": None})
    assert len(first) == len(second) == len(staged) >= 3
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, staged))
    assert [p.name for p in (tmp_path / "staged").iterdir() if (p / "meta.json").is_file()]  # it was staged


@pytest.mark.parametrize("task", ["crop", "biomass"])
def test_the_preflight_check_leaves_training_unchanged(results, task):
    """The one-batch check of every stage that starts a fine-tune puts back the weights, the
    modules' train/eval modes, the optimizer's moments (LightningCLI hands every fit the same
    optimizer object) and the random state: two epochs train on the same batches to the same
    losses with or without it."""
    import lightning.pytorch as pl

    from geofm import training

    config = cell_dir(results, task, "tiny", 0) / "config.effective.yaml"
    trainer = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "num_workers": 0, "pin_memory": False,
               "persistent_workers": True, "prefetch_factor": 2, "tf32": False}  # fmt: skip
    splits = results / "out" / "splits" / "crop"
    job = {"task": task, "trainer": trainer, "data_root": str(results.parent.parent / "resources" / "sample_data" /
           f"{task}-seed0-v1"), "splits_dir": str(splits), "allow_selection_on_reported_split": False}  # fmt: skip

    def first_epoch(preflight: bool, run_dir) -> list[float]:
        rt = training.runtime_settings(trainer, threads=1)
        cli = training.build_cli(config, rt, ["--trainer.max_epochs=2", f"--trainer.default_root_dir={run_dir}"])
        if preflight:
            training._dev_run(cli, job, rt, run_dir)
        losses = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        cli.trainer.callbacks.append(Record())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return losses

    without, with_check = (
        first_epoch(False, results.parent / f"{task}0"),
        first_epoch(True, results.parent / f"{task}1"),
    )
    assert len(without) >= 2 and with_check == without  # a loss after an optimizer step (crop: 1 batch per epoch)
