"""The results layout: the only place that knows where an experiment's files live.

    results/<experiment>/
      out/<task>/<model>/seed<N>/   config.yaml  config.effective.yaml  metrics.json  finetune.json
                                    evaluate.json  curves.csv
      out/hpo/<task>/<model>/       the search (hpo.enabled): best.json, trials.csv, plots
      out/summary.csv ...           experiment-level tables
      err/<task>_<model>_seed<N>.err
      predictions/<task>/<model>/seed<N>/<chip>.png
      logs/<rule>/<name>.log        benchmarks/<rule>/<name>.tsv
    scratch/<experiment>/<task>/<model>/seed<N>/   checkpoints, TerraTorch logs, prediction arrays

Every method takes the cell's parts as arguments; called without them it returns the Snakemake
pattern with `{task}`, `{model}` and `{seed}` wildcards, so the rules and the Python that reads
results afterwards (summary, evidence, watcher, wait, compare) share one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TASK, MODEL, SEED = "{task}", "{model}", "{seed}"
CELL_DIR = re.compile(r"(?P<task>[^/]+)/(?P<model>[^/]+)/seed(?P<seed>\d+)")  # used with fullmatch


class _Under:
    """A folder of the experiment's results folder: `layout.out` is '<results>/<experiment>/out'."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout, owner=None) -> str:
        return f"{layout.root}/{self.name}"


@dataclass(frozen=True)
class ResultsLayout:
    """Paths of one experiment. `results_dir` and `scratch_dir` are the config's folders."""

    results_dir: str | Path
    experiment: str
    scratch_dir: str | Path = "scratch"

    @classmethod
    def of(cls, experiment_dir: str | Path, scratch_dir: str | Path = "scratch") -> ResultsLayout:
        """The layout of an existing `results/<experiment>` folder."""
        experiment_dir = Path(experiment_dir)
        return cls(experiment_dir.parent, experiment_dir.name, scratch_dir)

    # top-level folders (strings, so that Snakemake patterns keep their braces)
    @property
    def root(self) -> str:
        return f"{self.results_dir}/{self.experiment}"

    out = _Under("out")
    err = _Under("err")
    predictions = _Under("predictions")
    logs = _Under("logs")
    benchmarks = _Under("benchmarks")

    @property
    def scratch(self) -> str:
        return f"{self.scratch_dir}/{self.experiment}"

    # one cell
    @staticmethod
    def cell(task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{task}/{model}/seed{seed}"

    @staticmethod
    def cell_name(task=TASK, model=MODEL, seed=SEED) -> str:
        """A cell as one file name part: <task>_<model>_seed<N>."""
        return f"{task}_{model}_seed{seed}"

    def cell_dir(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.out}/{self.cell(task, model, seed)}"

    def cell_file(self, name: str, task=TASK, model=MODEL, seed=SEED) -> str:
        """config.yaml, config.effective.yaml, metrics.json, finetune.json, evaluate.json, curves.csv"""
        return f"{self.cell_dir(task, model, seed)}/{name}"

    def err_file(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.err}/{self.cell_name(task, model, seed)}.err"

    def predictions_dir(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.predictions}/{self.cell(task, model, seed)}"

    def log(self, rule: str, name: str) -> str:
        return f"{self.logs}/{rule}/{name}.log"

    def benchmark(self, rule: str, name: str) -> str:
        return f"{self.benchmarks}/{rule}/{name}.tsv"

    def cell_scratch(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.scratch}/{self.cell(task, model, seed)}"

    def checkpoint(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.cell_scratch(task, model, seed)}/best.ckpt"

    def prediction_arrays(self, task=TASK, model=MODEL, seed=SEED) -> str:
        return f"{self.cell_scratch(task, model, seed)}/predictions.npz"

    # hyperparameter search of a task x model (the search's files; its trials run in scratch)
    def hpo_file(self, name: str, task=TASK, model=MODEL) -> str:
        """base.yaml, worker<W>.json, best.json, trials.csv, optimization_history.png, ..."""
        return f"{self.out}/hpo/{task}/{model}/{name}"

    def hpo_scratch(self, task=TASK, model=MODEL) -> str:
        """The study's journal (unless an RDB holds it) and its trials' run folders."""
        return f"{self.scratch}/hpo/{task}/{model}"

    # per task and experiment-level outputs
    def splits_dir(self, task=TASK) -> str:
        return f"{self.out}/splits/{task}"

    def baseline(self, task=TASK) -> str:
        return f"{self.out}/baselines/{task}.json"

    def dataset_manifest(self, task=TASK) -> str:
        return f"{self.out}/datasets/{task}.json"

    def curves_plot(self, task=TASK) -> str:
        return f"{self.out}/curves/{task}.png"

    def table(self, name: str) -> str:
        """Experiment-level outputs under out/: summary.csv, aggregate.json, manifest.json, ..."""
        return f"{self.out}/{name}"

    # reading what a run left behind
    def cell_of(self, path: str | Path, name: str = "metrics.json") -> tuple[str, str, int] | None:
        """(task, model, seed) when `path` is that cell's `name` file in this layout, else None."""
        path = Path(path)
        if path.name != name or not path.parent.is_relative_to(self.out):
            return None
        m = CELL_DIR.fullmatch(path.parent.relative_to(self.out).as_posix())
        return (m["task"], m["model"], int(m["seed"])) if m else None

    def dataset_of(self, path: str | Path) -> str | None:
        """The task when `path` is one of this layout's dataset manifests, else None."""
        path = Path(path)
        return path.stem if path.suffix == ".json" and path.parent == Path(self.dataset_manifest("x")).parent else None

    def finished_cells(self) -> list[tuple[str, str, int]]:
        """(task, model, seed) of every cell folder that holds a metrics.json, sorted."""
        return sorted(filter(None, (self.cell_of(p) for p in Path(self.out).glob("*/*/seed*/metrics.json"))))

    def dataset_manifests(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(Path(self.dataset_manifest("x")).parent.glob("*.json"))}

    def err_files(self) -> list[Path]:
        return sorted(Path(self.err).glob("*.err"))
