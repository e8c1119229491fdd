#!/usr/bin/env python3
"""Search overhead on the landslide sample data (prithvi_eo_tiny, random init, 1 epoch, batch 2):

- one trial (geofm.hpo.run_worker with a one-point space equal to the cell's settings: study on a
  journal file, heartbeat thread, split guard, Lightning pruning callback, user attrs) versus a
  plain fine-tune of the same config (geofm.training.finetune), in one process, interleaved,
  after a warm-up fit so that imports and first-build costs count on neither side;
- a tiny study: 4 trials by 2 worker processes (`python -m geofm.hpo spec.json`, one torch thread
  each), wall time from start to both workers' exit, imports included.

    .venv/bin/python benchmarks/hpo.py [--repeats 3] [--out benchmarks/results/hpo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' helper renders a recipe for sample data

from conftest import CPU, render_for_sample  # noqa: E402

from geofm import hpo, sample_data  # noqa: E402
from geofm.tasks import TASKS  # noqa: E402

TASK = "landslide"
SPACE = hpo.merge_space(hpo.DEFAULT_SPACE, {"batch_size": {"type": "categorical", "choices": [2, 4]}})


def one_trial_vs_plain(config: Path, job: dict, work: Path, repeats: int) -> dict:
    from geofm import training

    base = yaml.safe_load(config.read_text())
    point = {
        "lr": {"type": "categorical", "choices": [base["optimizer"]["init_args"]["lr"]]},
        "batch_size": {"type": "categorical", "choices": [base["data"]["init_args"]["batch_size"]]},
    }
    plain, trial, trial_own = [], [], []
    for i in range(repeats + 1):  # the first round is a warm-up
        run = work / f"plain{i}"
        out = {k: str(run / f"out.{k}") for k in ("checkpoint", "curves", "resources", "effective_config")}
        run.mkdir(parents=True)
        t0 = time.perf_counter()
        training.finetune(config, run, job, 1, out)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        study = hpo.open_study(f"point{i}", str(work / "point.journal"), TASKS[TASK].selection_mode)
        hpo.run_worker(study, config, job, point, 1, work / f"trials{i}")
        trial.append(time.perf_counter() - t0)
        trial_own.append(study.trials[0].user_attrs["wall_s"])
    plain, trial, trial_own = plain[1:], trial[1:], trial_own[1:]
    return {
        "plain_finetune_s": [round(x, 2) for x in plain],
        "one_trial_s": [round(x, 2) for x in trial],
        "trial_objective_s": trial_own,
        "median_overhead_s": round(statistics.median(t - p for t, p in zip(trial, plain)), 2),
    }


def tiny_study(config: Path, job: dict, work: Path) -> dict:
    procs = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    for worker in range(2):
        spec = {"study": "tiny", "storage": str(work / "tiny.journal"), "direction": TASKS[TASK].selection_mode,
                "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"}, "worker": worker,
                "config": str(config), "job": job, "space": SPACE, "n_trials": 4,
                "trials_dir": str(work / "tiny-trials"), "threads": 1}  # fmt: skip
        path = work / f"tiny{worker}.json"
        path.write_text(json.dumps(spec))
        with open(work / f"tiny{worker}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "geofm.hpo", str(path)], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    codes = [p.wait(1800) for p in procs]
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="tiny", storage=hpo.make_storage(str(work / "tiny.journal")))
    return {
        "exit_codes": codes,
        "wall_s": round(wall, 1),
        "worker_jobs": 2,
        "counts": hpo.counts(study),
        "trial_wall_s": [t.user_attrs.get("wall_s") for t in study.trials],
        "cost": hpo.cost(study),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-study", action="store_true", help="only one trial versus a plain fine-tune")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="geofm-hpo-bench-"))
    sample_data.write(TASK, work / "data", seed=0)
    config = render_for_sample(TASKS[TASK], TASKS[TASK].recipe.read_text(), work / "data", work, work / "cache")
    job = {"task": TASK, "trainer": CPU, "data_root": str(work / "data"), "splits_dir": str(work / "splits"),
           "allow_selection_on_reported_split": False}  # fmt: skip
    result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    if not args.skip_study:
        result["tiny_study"] = tiny_study(config, job, work)
    result["one_trial_vs_plain"] = one_trial_vs_plain(config, job, work, args.repeats)
    result["load_average_after"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and sample data: about 1 GB
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
