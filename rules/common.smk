# The only place with Python helpers: the resolved experiment, the results layout, input functions.
import json
import os
import sys

from geofm import config as experiment_config
from geofm import download, manifest, sample_data
from geofm.layout import ResultsLayout
from geofm.tasks import TASKS

try:
    # Plain data: Snakemake reads JSON config files (what the watcher passes) into OrderedDicts.
    EXP = experiment_config.resolve(json.loads(json.dumps(config)))
except experiment_config.ConfigError as error:
    # One line, before any job is planned.
    sys.exit(f"config error: {error}")

# Scripts import the geofm package; inside --sdm conda or env-module environments, where the
# project is not installed, they find it through PYTHONPATH (jobs inherit this environment).
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.getenv("PYTHONPATH")])))

NAME = EXP["experiment"]
# Where every file lives (geofm/layout.py). Called without arguments its methods give the
# patterns with {task}, {model}, {seed} wildcards.
L = ResultsLayout(EXP["results_dir"], NAME, EXP["scratch_dir"])
CACHE = EXP["cache_dir"]
# Generated data is keyed by what makes it (the same path geofm.config gives a sample task).
SAMPLE_DIR = f"{EXP['sample_data']['root']}/{{task}}-seed{EXP['sample_data']['seed']}-v{sample_data.GENERATOR_VERSION}"
# Scheduling order when cores are scarce: cheap steps that unblock the long jobs first, then
# the long jobs; per-task extras (baselines, plots, aggregation) fill the idle cores.
PRIORITY_UNBLOCKS = 20
PRIORITY_LONG = 10
CELLS = experiment_config.cells(EXP)
HPO = EXP["hpo"]
MODELS = list(EXP["models"])
HOLDOUT_TASKS = [t for t in TASKS if TASKS[t].holdout]


wildcard_constraints:
    task="|".join(TASKS),
    model="|".join(MODELS),
    seed=r"\d+",
    worker=r"\d+",
    weights=r"[^/]+",


def settings(wildcards):
    """Everything that defines one cell, paths included: rendered into its config (the rerun
    trigger of everything downstream)."""
    return cell_settings(wildcards.task, wildcards.model, int(wildcards.seed))


def cell_settings(task, model, seed):
    cell = experiment_config.cell_settings(EXP, task, model, seed)
    cell["splits_dir"] = L.splits_dir(task)
    cell["weights_file"] = weights_file(model) if needs_download(model) else None
    return cell


def task_data(wildcards):
    """The dataset folder as an input only when the workflow makes it (sample data, download)."""
    task = EXP["tasks"][wildcards.task]
    return task["data_root"] if task["sample"] or task["download"] else []


def job(wildcards):
    """What a heavy job needs besides its config: the trainer settings, and where the data and the
    hold-out lists are, to measure which chips select the checkpoint and which are reported."""
    task = EXP["tasks"][wildcards.task]
    return {
        "task": wildcards.task,
        "trainer": EXP["trainer"],
        "data_root": task["data_root"],
        "splits_dir": L.splits_dir(wildcards.task) if TASKS[wildcards.task].holdout else None,
        "allow_selection_on_reported_split": task["allow_selection_on_reported_split"],
        "preflight": EXP["preflight"],
        "stage_dir": f"{EXP['cache_dir']}/staged" if EXP["trainer"]["stage_data"] else None,
        "data_manifest": L.dataset_manifest(wildcards.task),
    }


def holdout_lists(wildcards, name):
    """The hold-out split lists of a task that selects on a hold-out of its training chips."""
    return f"{L.splits_dir(wildcards.task)}/{name}.txt" if TASKS[wildcards.task].holdout else []


def search_render_inputs(wildcards):
    """What a config is rendered from: the recipe, the hold-out lists, the checked dataset and the
    weights file."""
    inputs = {
        "recipe": EXP["tasks"][wildcards.task]["recipe"],
        "splits": holdout_lists(wildcards, "select"),
        # The dataset passed its checks (validate_data) before any of its cells runs; ancient():
        # re-checking changed data does not re-run cells whose config is unchanged.
        "checked": ancient(L.dataset_manifest(wildcards.task)),
    }
    if needs_download(wildcards.model):
        inputs["weights"] = weights_file(wildcards.model)
    return inputs


def render_inputs(wildcards):
    """A seed cell's: the same, and the search's best parameters when there is a search."""
    inputs = search_render_inputs(wildcards)
    if HPO["enabled"]:
        inputs["best"] = L.hpo_file("best.json", wildcards.task, wildcards.model)
    return inputs


def search_settings(wildcards):
    """The settings the search's trials start from: the first seed's, before any searched value."""
    return cell_settings(wildcards.task, wildcards.model, EXP["seeds"][0])


def search_params(wildcards):
    """Everything an hpo_worker or hpo_best job needs to open and run the task x model's study."""
    scratch = os.path.abspath(L.hpo_scratch(wildcards.task, wildcards.model))
    return {
        "study": f"{NAME}/{wildcards.task}/{wildcards.model}",
        "storage": HPO["storage"] or f"{scratch}/study.journal",
        "direction": TASKS[wildcards.task].selection_mode,
        "sampler": HPO["sampler"],
        "pruner": HPO["pruner"],
        "heartbeat": HPO["heartbeat"],
        "space": experiment_config.search_space(EXP, wildcards.task, wildcards.model),
        "trials": HPO["trials"],
        "trials_dir": f"{scratch}/trials",
    }


def needs_download(model):
    m = EXP["models"][model]
    return m["pretrained"] and m["weights"] is None


def weights_key(model):
    """The weights cache is keyed by what identifies the file: hub id, file name and revision."""
    m = EXP["models"][model]
    return download.weights_key(m["hub_id"], m["hub_filename"], m["hub_revision"])


def weights_file(model):
    return f"{CACHE}/weights/{weights_key(model)}/backbone.pt"


def cell_files(pattern_of):
    """`pattern_of(task, model, seed)` for every cell, e.g. cell_files(L.err_file)."""
    return [pattern_of(*c) for c in CELLS]


def metrics_file(task, model, seed):
    return L.cell_file("metrics.json", task, model, seed)


def finetune_file(task, model, seed):
    return L.cell_file("finetune.json", task, model, seed)


def config_file(task, model, seed):
    return L.cell_file("config.yaml", task, model, seed)


def dataset_fingerprint(wildcards):
    """Re-hash a dataset only when a file was added, removed, resized or touched."""
    task = EXP["tasks"][wildcards.task]
    if task["sample"] or task["download"]:
        return "made by the workflow (sample_data or fetch_data)"
    return manifest.fingerprint(task["data_root"])


def provenance():
    """Parse-time facts for the manifest; a new commit or config re-runs it."""
    volatile = ("versioning", "enabled_tasks", "cache_dir")
    return {
        "code": manifest.code_version(workflow.basedir),
        "config_hash": manifest.sha256_json({k: v for k, v in EXP.items() if k not in volatile}),
        "seeds": EXP["seeds"],
        "packages": manifest.package_versions(),
        "weights": {
            m: (spec["weights"] or (weights_file(m) if needs_download(m) else None))
            for m, spec in EXP["models"].items()
        },
    }


# What the summarize rule and the onerror handler need besides the cells (geofm/outputs.py).
SUMMARIZE = {
    "experiment": {"experiment": NAME, "description": EXP["description"]},
    "tasks": EXP["enabled_tasks"],
    "bootstrap": EXP["bootstrap"],
    "references": {m: spec["reference"] for m, spec in EXP["models"].items()},
    "dpi": EXP["predictions"]["dpi"],
    "provenance": provenance(),
}


def final_targets():
    targets = cell_files(metrics_file) + cell_files(L.predictions_dir)
    targets += [L.table(name) for name in ("summary.csv", "aggregate.csv", "cost.csv", "manifest.json")]
    targets.append(L.table("overview.html"))
    if EXP["versioning"]["enabled"]:  # rules/version.smk: dvc + git, after everything else
        targets.append(f"{L.scratch}/versioning/version.json")
    return targets
