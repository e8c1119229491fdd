# The only place with Python helpers: the resolved experiment, paths and input functions.
import os
import sys

from geofm import config as experiment_config
from geofm.tasks import TASKS

try:
    EXP = experiment_config.resolve(config)
except experiment_config.ConfigError as error:
    # One line, before any job is planned.
    sys.exit(f"config error: {error}")

# Scripts import the geofm package; inside --sdm conda or env-module environments, where the
# project is not installed, they find it through PYTHONPATH (jobs inherit this environment).
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.getenv("PYTHONPATH")])))

NAME = EXP["experiment"]
RESULTS = f"{EXP['results_dir']}/{NAME}"
OUT = f"{RESULTS}/out"
ERR = f"{RESULTS}/err"
PRED = f"{RESULTS}/predictions"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SCRATCH = f"{EXP['scratch_dir']}/{NAME}"
CACHE = EXP["cache_dir"]
CELL = "{task}/{model}/seed{seed}"
CELL_NAME = "{task}_{model}_seed{seed}"
CELLS = experiment_config.cells(EXP)
MODELS = list(EXP["models"])


wildcard_constraints:
    task="|".join(TASKS),
    model="|".join(MODELS),
    seed=r"\d+",


def settings(wildcards):
    """Everything that defines one cell: rendered into its config (the rerun trigger)."""
    return experiment_config.cell_settings(EXP, wildcards.task, wildcards.model, int(wildcards.seed))


def task_data(wildcards):
    """The dataset folder as an input only when the workflow generates it (sample data)."""
    task = EXP["tasks"][wildcards.task]
    return task["data_root"] if task["sample"] else []


def splits_dir(wildcards):
    return f"{OUT}/splits/{wildcards.task}"


def render_inputs(wildcards):
    inputs = {"recipe": EXP["tasks"][wildcards.task]["recipe"]}
    if wildcards.task == "crop":
        inputs["splits"] = f"{OUT}/splits/crop/select.txt"
    if needs_download(wildcards.model):
        inputs["weights"] = weights_file(wildcards.model)
    return inputs


def needs_download(model):
    m = EXP["models"][model]
    return m["pretrained"] and m["weights"] is None


def weights_file(model):
    return f"{CACHE}/weights/{model}/backbone.pt"


def first_seed_config(wildcards):
    return f"{OUT}/{wildcards.task}/{wildcards.model}/seed{EXP['seeds'][0]}/config.yaml"


def preflight_done(wildcards):
    if not EXP["preflight"]:
        return []
    return f"{OUT}/{wildcards.task}/{wildcards.model}/preflight.json"


def cell_files(pattern):
    return [pattern.format(task=c.task, model=c.model, seed=c.seed) for c in CELLS]


def final_targets():
    targets = cell_files(f"{OUT}/{CELL}/metrics.json")
    targets += cell_files(f"{PRED}/{CELL}")
    targets += [f"{OUT}/summary.csv", f"{OUT}/summary.json"]
    return targets
