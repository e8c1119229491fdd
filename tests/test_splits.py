"""Honest split labels for any recipe: measured from what the datamodule holds, a leak refused
before training (or, when allowed, marked LEAKY in every output), and the workflow's contract
(a monitored checkpoint, a CSV logger) added to a user recipe that lacks it."""

from __future__ import annotations

import csv
import json
import time

import pytest
import yaml
from conftest import CPU, render_for_sample, run_snakemake, write_config

from geofm import render, sample_data, splits
from geofm.tasks import TASKS

# TerraTorch's own multi-temporal crop example, reduced to its paths and a tiny backbone: its
# datamodule validates AND tests on the official validation chips, and it has no checkpoint callback.
LEAKY_CROP = """
trainer: {accelerator: auto, max_epochs: 50, log_every_n_steps: 1, enable_progress_bar: false}
data:
  class_path: terratorch.datamodules.MultiTemporalCropClassificationDataModule
  init_args:
    data_root: ${data_root}
    batch_size: 4
    expand_temporal_dimension: true
    reduce_zero_label: true
    train_transform:
      - class_path: terratorch.datasets.transforms.FlattenTemporalIntoChannels
      - class_path: albumentations.HorizontalFlip
      - class_path: albumentations.pytorch.transforms.ToTensorV2
      - class_path: terratorch.datasets.transforms.UnflattenTemporalFromChannels
        init_args: {n_timesteps: 3}
model:
  class_path: terratorch.tasks.SemanticSegmentationTask
  init_args:
    model_factory: EncoderDecoderFactory
    model_args:
      backbone: ${backbone}
      backbone_pretrained: false
      backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
      backbone_num_frames: 3
      necks:
        - {name: SelectIndices, indices: "${neck_indices}"}
        - {name: ReshapeTokensToImage, effective_time_dim: 3}
      decoder: UperNetDecoder
      num_classes: 13
    loss: ce
    ignore_index: -1
    class_names: [Natural Vegetation, Forest, Corn, Soybeans, Wetlands, Developed / Barren, Open Water,
                  Winter Wheat, Alfalfa, Fallow / Idle Cropland, Cotton, Sorghum, Other]
optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}
"""


def own_holdout_biomass(data_root) -> str:
    """The bundled biomass recipe with its own hold-out: validation on two chips of the training
    folder named in a split file of the user's, and no checkpoint callback or logger."""
    recipe = yaml.safe_load(TASKS["biomass"].recipe.read_text())
    del recipe["trainer"]["callbacks"], recipe["trainer"]["logger"]
    train = sorted(p.name.removesuffix("_img.tif") for p in (data_root / "train_images").glob("*_img.tif"))
    (data_root / "my_holdout.txt").write_text("".join(f"{c}\n" for c in train[:2]))
    (data_root / "my_train.txt").write_text("".join(f"{c}\n" for c in train[2:]))
    init = recipe["data"]["init_args"]
    init.update(val_data_root="${data_root}/train_images", val_label_data_root="${data_root}/train_labels",
                val_split="${data_root}/my_holdout.txt", train_split="${data_root}/my_train.txt")  # fmt: skip
    return yaml.safe_dump(recipe, sort_keys=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits_data")
    for task in ("crop", "biomass"):
        sample_data.write(task, root / task, seed=0)
    return root


def _facts(task, recipe_text, data_root, work, cache, **task_settings):
    from geofm import training

    config = render_for_sample(TASKS[task], recipe_text, data_root, work, cache, **task_settings)
    cli = training.build_cli(config, training.runtime_settings(CPU, threads=1))
    facts = splits.measure(cli.datamodule, task, data_root, work / "splits" if TASKS[task].holdout else None)
    return facts, yaml.safe_load(config.read_text())


def test_leak_is_measured_and_refused_in_one_line_naming_the_keys(data, tmp_path, shared_cache):
    facts, config = _facts("crop", LEAKY_CROP, data / "crop", tmp_path, shared_cache)
    assert facts["selection"]["label"] == facts["test"]["label"] == TASKS["crop"].test_split
    assert facts["shared_selection_test"] == facts["test"]["chips"] == 3
    with pytest.raises(splits.SplitLeak) as info:
        splits.check(facts, config, "crop", allowed=False)
    line = str(info.value)
    assert "\n" not in line and "3 of the 3 chips" in line
    assert "data.init_args.data_root" in line and "allow_selection_on_reported_split: true" in line
    allowed = splits.check(facts, config, "crop", allowed=True)
    assert allowed["leaky"] and allowed["selection"]["label"].startswith("LEAKY: ")


def test_user_holdout_is_labelled_by_its_facts_and_a_checkpoint_callback_is_added(data, tmp_path, shared_cache):
    recipe = own_holdout_biomass(data / "biomass")
    facts, config = _facts("biomass", recipe, data / "biomass", tmp_path, shared_cache)
    assert facts["selection"]["label"] == "custom: 2 chips from train_images"
    assert facts["selection"]["label"] != TASKS["biomass"].selection_split
    assert facts["test"]["label"] == TASKS["biomass"].test_split and facts["shared_selection_test"] == 0
    callbacks = config["trainer"]["callbacks"]
    (added,) = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert added["init_args"]["monitor"] == "val/RMSE" and added["init_args"]["mode"] == "min"
    assert config["trainer"]["logger"]["class_path"].endswith("CSVLogger")


def test_rendered_config_says_what_the_workflow_added(tmp_path):
    notes: list[str] = []
    settings = {"task": "crop", "model": "m", "seed": 0, "backbone": "prithvi_eo_tiny", "pretrained": False,
                "neck_indices": [1, 2, 3, 4], "trainer": {**CPU, "accelerator": "cpu"}, "overrides": {}}  # fmt: skip
    paths = {"data_root": "/d", "run_dir": "/run", "splits_dir": "/s", "ckpt_path": None}
    config = render.render(LEAKY_CROP, settings, paths, notes)
    render.write(config, tmp_path / "c.yaml", render.header(settings, "my.yaml", notes))
    text = (tmp_path / "c.yaml").read_text()
    assert "# Added by the workflow to the recipe:" in text
    assert "# - trainer.callbacks: added a ModelCheckpoint monitoring val/mIoU (max)" in text
    assert "# - trainer.logger: added a CSVLogger in /run/logs" in text


@pytest.fixture(scope="module")
def user_recipes(tmp_path_factory, data, shared_cache):
    """Two user recipes through the whole workflow: the leaky crop example (refused, then allowed)
    and a biomass recipe with its own hold-out and no checkpoint callback."""
    work = tmp_path_factory.mktemp("user_recipes")
    (work / "crop_example.yaml").write_text(LEAKY_CROP)
    (work / "biomass_holdout.yaml").write_text(own_holdout_biomass(data / "biomass"))
    quick = {"max_epochs": 1, "batch_size": 2}
    tasks = {name: {"enabled": False} for name in TASKS}
    tasks["crop"] = {"data_root": str(data / "crop"), "recipe": str(work / "crop_example.yaml"), "overrides": quick}
    refused_config = write_config(work / "refused.yaml", experiment="leak", tasks=tasks, cache_dir=str(shared_cache),
                                  predictions={"samples": 1})  # fmt: skip
    start = time.monotonic()
    refused = run_snakemake(work, "--cores", "2", configfile=refused_config, timeout=600)
    refused_after = time.monotonic() - start
    err = work / "results" / "leak" / "err" / "crop_tiny_seed0.err"
    refused_err = err.read_text() if err.is_file() else ""  # the allowed run below removes it
    scratch = work / "scratch" / "leak" / "crop" / "tiny" / "seed0"  # the allowed run trains here
    refused_left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")) if scratch.is_dir() else []
    tasks["crop"]["allow_selection_on_reported_split"] = True
    tasks["biomass"] = {"data_root": str(data / "biomass"), "recipe": str(work / "biomass_holdout.yaml"),
                        "overrides": quick}  # fmt: skip
    allowed_config = write_config(work / "allowed.yaml", experiment="leak", tasks=tasks, cache_dir=str(shared_cache),
                                  predictions={"samples": 1})  # fmt: skip
    allowed = run_snakemake(work, "--cores", "2", configfile=allowed_config, timeout=900)
    return {"work": work, "refused": refused, "refused_err": refused_err, "refused_after": refused_after,
            "refused_left": refused_left,
            "allowed": allowed}  # fmt: skip


@pytest.mark.e2e
def test_leaky_user_recipe_is_refused_before_training(user_recipes):
    refused, err = user_recipes["refused"], user_recipes["refused_err"]
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "stage: finetune" in err  # refused at the start of the fine-tune job, before any training
    cause = next(line for line in err.splitlines() if line.startswith("cause: "))
    assert "SplitLeak: tasks.crop: the checkpoint would be selected on 3 of the 3 chips that are reported" in cause
    assert "allow_selection_on_reported_split: true" in cause
    left = user_recipes["refused_left"]  # what the refused fine-tune left in its scratch folder
    assert not [p for p in left if p.startswith("checkpoints/") or p.endswith("metrics.csv")], left
    print(f"\nleaky recipe refused after {user_recipes['refused_after']:.0f} s")


@pytest.mark.e2e
def test_allowed_leak_runs_and_every_output_says_leaky_while_a_user_holdout_keeps_its_facts(user_recipes):
    allowed, out = user_recipes["allowed"], user_recipes["work"] / "results" / "leak" / "out"
    assert allowed.returncode == 0, allowed.stderr[-4000:]
    rows = {r["task"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["crop"]["leaky"] == "True" and rows["crop"]["selection_split"].startswith("LEAKY: ")
    assert rows["crop"]["shared_chips"] == "3"
    assert rows["biomass"]["leaky"] == "False" and rows["biomass"]["shared_chips"] == "0"
    assert rows["biomass"]["selection_split"] == "custom: 2 chips from train_images"
    assert rows["biomass"]["test_split"] == TASKS["biomass"].test_split
    aggregate = json.loads((out / "aggregate.json").read_text())["rows"]
    assert {r["leaky"] for r in aggregate if r["task"] == "crop"} == {"LEAKY"}
    assert {r["leaky"] for r in aggregate if r["task"] == "biomass"} == {""}
    assert "LEAKY" in (out / "aggregate.md").read_text()
    overview = (out / "overview.html").read_text()
    assert "<b>LEAKY</b>: the checkpoints of crop/tiny were selected" in overview
    finetune = json.loads((out / "biomass" / "tiny" / "seed0" / "finetune.json").read_text())
    assert finetune["selection"]["monitor"] == "val/RMSE" and finetune["selection"]["best_score"] is not None
    metrics = json.loads((out / "crop" / "tiny" / "seed0" / "metrics.json").read_text())
    assert metrics["splits"]["selection"]["chips"] == metrics["splits"]["test"]["chips"] == 3
    assert len(metrics["splits"]["test"]["sha256"]) == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(v.get("leaky") for v in manifest["splits"].values())
    rendered = (out / "biomass" / "tiny" / "seed0" / "config.yaml").read_text()
    assert "added a ModelCheckpoint monitoring val/RMSE (min)" in rendered
