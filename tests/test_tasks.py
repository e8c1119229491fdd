"""Every registered task is complete: its hooks, its sample data (read by TerraTorch through the
task's own recipe), one batch of training through it; and generic code never names a task."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import yaml
from conftest import CPU, REPO, VENV_BIN, render_for_sample

from geofm import config as experiment_config
from geofm import sample_data
from geofm.tasks import REGRESSION, SEGMENTATION, TASKS
from geofm.tasks.base import Task, write_split_lists

HOOKS = ("check_layout", "files", "labels", "write_sample")  # rgb_panels has a default (drawn below for each)
HOLDOUT_HOOKS = ("training_ids", "test_ids")


def overridden(task: Task, hook: str) -> bool:
    return getattr(type(task), hook) is not getattr(Task, hook)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_every_hook_and_field(name):
    task = TASKS[name]
    assert task.name == name and task.title and task.kind in (SEGMENTATION, REGRESSION)
    for hook in HOOKS + (HOLDOUT_HOOKS if task.holdout else ()):
        assert overridden(task, hook), f"{name} does not implement {hook}"
    assert task.headline in task.definitions and task.headline == task.key_metrics[0]
    assert len(task.key_metrics) == 3 and task.selection_split and task.test_split
    assert task.recipe.is_file(), f"{name}: no recipe at {task.recipe}"
    assert task.selection_metric.startswith("val/")
    if task.kind == SEGMENTATION:
        assert len(task.class_names) >= 2
        if task.positive_class is not None:
            assert f"{task.positive_name}_IoU" in task.definitions
    else:
        assert task.units and len(task.value_bins) >= 2
    assert task.sample_counts
    assert task.image_format and task.label_format and task.selection_mode in ("max", "min")


def test_schema_and_config_take_task_names_from_the_registry():
    schema = experiment_config.schema()
    assert set(schema["properties"]["tasks"]["properties"]) == set(TASKS)
    model = schema["$defs"]["model"]["properties"]
    assert set(model["task_overrides"]["properties"]) == set(TASKS) == set(model["reference"]["properties"])
    default = experiment_config.validate_schema({})
    assert {t: default["tasks"][t]["enabled"] for t in TASKS} == {t: TASKS[t].default_enabled for t in TASKS}


def test_generic_code_never_names_a_task():
    """The task modules are the only place that knows a task: no branch, list or text elsewhere."""
    names = "|".join(re.escape(n) for n in TASKS) + "|crop|landslide|biomass"
    pattern = re.compile(rf"\b({names})\b", re.IGNORECASE)
    paths = [p for p in (REPO / "geofm").rglob("*.py") if "tasks" not in p.relative_to(REPO / "geofm").parts]
    paths += list((REPO / "rules").glob("*.smk")) + list((REPO / "scripts").glob("*.py"))
    paths += [REPO / "Snakefile", REPO / "config" / "schema.yaml"]
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in paths
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not hits, "task names outside geofm/tasks/:\n" + "\n".join(hits)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name in TASKS:
        sample_data.write(name, root / name, seed=0)
    return root


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sample_data_passes_its_layout_check_and_the_checks_catch_a_broken_copy(name, samples, tmp_path):
    task = TASKS[name]
    assert task.check_layout(samples / name) is None
    files = task.split_files(samples / name)
    assert files and all(f.is_file() for split in files.values() for f in split)
    assert task.check_layout(tmp_path / "nowhere") is not None
    assert "fix:" in task.check_layout(tmp_path / "nowhere")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_labels_and_drawing_hooks_work_on_the_sample_data(name, samples, tmp_path):
    task = TASKS[name]
    splits = None
    if task.holdout:
        splits = tmp_path / "splits"
        write_split_lists(task.holdout_split(samples / name), splits)
    train = list(task.labels(samples / name, "train", splits))
    test = list(task.labels(samples / name, "test", splits))
    assert train and test
    labelled = np.concatenate([t[t != -1] for t in train])
    if task.kind == SEGMENTATION:
        assert set(np.unique(labelled).astype(int)) <= set(range(len(task.class_names)))
    first_image = sorted(task.split_files(samples / name).values())[0][0]
    panels = task.rgb_panels(first_image)
    assert panels and all(p.ndim == 3 and p.shape[-1] == 3 and 0 <= p.min() and p.max() <= 1 for _, p in panels)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_terratorch_reads_the_sample_data_and_trains_one_batch(name, samples, tmp_path, shared_cache):
    """Through the task's own recipe and TerraTorch's own datamodule: every split yields a sample,
    and one batch of each stage runs (the workflow's preflight)."""
    from geofm import training

    task = TASKS[name]
    config = render_for_sample(task, task.recipe.read_text(), samples / name, tmp_path, shared_cache)
    cli = training.build_cli(config, training.runtime_settings(CPU, threads=1))
    dm = cli.datamodule
    dm.setup("fit")
    dm.setup("test")
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert len(dataset) > 0
        sample = dataset[0]
        assert sample["image"].ndim >= 3 and sample["mask"].ndim >= 2
    out = tmp_path / "preflight.json"
    job = {"task": name, "trainer": CPU, "data_root": str(samples / name), "splits_dir": str(tmp_path / "splits"),
           "allow_selection_on_reported_split": False}  # fmt: skip
    training.preflight(config, tmp_path / "preflight", job, 1, out)
    report = json.loads(out.read_text())
    assert report["stages"] == ["fit", "validate", "test", "predict"] and report["predicted"] > 0
    # The bundled recipe selects and reports on the splits its task says, measured, and disjoint.
    facts = report["splits"]
    assert (facts["selection"]["label"], facts["test"]["label"]) == (task.selection_split, task.test_split)
    assert facts["shared_selection_test"] == 0 and not facts["leaky"]
    assert facts["selection"]["chips"] > 0 and facts["test"]["chips"] > 0


def test_registry_finds_a_task_module_without_any_generic_edit(tmp_path):
    """A task in another package registers itself through the `geofm.tasks` entry-point group."""
    package = tmp_path / "extra_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(
        "from geofm.tasks.landslide import Landslide\n"
        "import dataclasses\n"
        "from geofm.tasks.landslide import TASK as BASE\n"
        "TASK = dataclasses.replace(BASE, name='toy', title='A toy task')\n"
    )
    dist = tmp_path / "extra_tasks-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-tasks\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[geofm.tasks]\ntoy = extra_tasks.toy\n")
    code = "from geofm.tasks import TASKS; print(sorted(TASKS))"
    out = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "toy" in out.stdout and all(name in out.stdout for name in TASKS)


@pytest.fixture(scope="module")
def burn_scars_run(tmp_path_factory, shared_cache):
    """The fourth task, end to end on its sample data (it is off in the default experiment)."""
    from conftest import run_snakemake, write_config

    workdir = tmp_path_factory.mktemp("burn_scars")
    tasks = {name: {"enabled": False} for name in TASKS}
    tasks["burn_scars"] = {"enabled": True, "overrides": {"max_epochs": 1, "batch_size": 2, "lr": 1.0e-3}}
    config = write_config(
        workdir / "config.yaml", experiment="burn", tasks=tasks, preflight=False,
        predictions={"samples": 1}, cache_dir=str(shared_cache),
    )  # fmt: skip
    result = run_snakemake(workdir, "--cores", "2", configfile=config, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir / "results" / "burn"


@pytest.mark.e2e
def test_burn_scars_cell_runs_end_to_end_with_honest_splits(burn_scars_run):
    import csv

    from PIL import Image

    task = TASKS["burn_scars"]
    cell = burn_scars_run / "out" / "burn_scars" / "tiny" / "seed0"
    pinned = json.loads((cell / "metrics.json").read_text())["pinned"]
    assert 0 <= pinned["burned_IoU"] <= 1 and "burned_F1" in pinned and "mIoU" in pinned
    pngs = list((burn_scars_run / "predictions" / "burn_scars" / "tiny" / "seed0").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size[0] > 100
    (row,) = csv.DictReader(open(burn_scars_run / "out" / "summary.csv"))
    assert (row["task"], row["status"], row["headline_metric"]) == ("burn_scars", "ok", "burned_IoU")
    assert row["test_split"] == task.test_split and "validation" in row["test_split"]
    assert row["selection_split"] == task.selection_split and "hold-out" in row["selection_split"]
    data = yaml.safe_load((cell / "config.yaml").read_text())["data"]["init_args"]
    assert data["val_split"].endswith("select.txt") and data["test_split"].endswith("test.txt")
    assert data["val_data_root"].endswith("training") and data["test_data_root"].endswith("validation")
    splits = burn_scars_run / "out" / "splits" / "burn_scars"
    select, test = (set((splits / f"{n}.txt").read_text().split()) for n in ("select", "test"))
    assert select and test and not select & test
