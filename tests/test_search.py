"""The benchmark protocol through the workflow: a hyperparameter search as worker jobs, the seed
cells trained with its best parameters, the GEO-Bench-2 view (IQM, leaderboard export)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from conftest import job_counts, run_snakemake, write_config

from geofm import hpo, protocol
from geofm.tasks import TASKS

SEARCH = {
    "enabled": True,
    "trials": 4,
    "workers": 2,
    "space": {"batch_size": {"type": "categorical", "choices": [2, 4]}},  # the sample split is small
    "heartbeat": {"interval": 5, "grace_period": 30, "max_retry": 3},
}


def search_config(path, cache, **changes):
    tasks = {name: {"enabled": False} for name in TASKS}
    tasks["landslide"] = {"overrides": {"max_epochs": 1, "batch_size": 2}}
    settings = dict(experiment="search", seeds=[0, 1], tasks=tasks, hpo=SEARCH, predictions={"samples": 1},
                    cache_dir=str(cache))  # fmt: skip
    settings.update(changes)
    return write_config(path, **settings)


def test_plan_shows_workers_best_and_seed_cells_after_it(tmp_path, shared_cache):
    config = search_config(tmp_path / "c.yaml", shared_cache)
    plan = run_snakemake(tmp_path, "--dry-run", configfile=config)
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout)
    assert (counts["hpo_worker"], counts["hpo_best"], counts["render_search_config"], counts["finetune"]) == (
        2,
        1,
        1,
        2,
    )
    seeds = [b for b in re.split(r"\n(?=(?:local)?rule )", plan.stdout) if b.startswith("rule finetune")]
    assert len(seeds) == 2 and all("out/hpo/landslide/tiny/best.json" in b for b in seeds)  # rendered with the best


@pytest.fixture(scope="module")
def searched(tmp_path_factory, shared_cache):
    workdir = tmp_path_factory.mktemp("search")
    config = search_config(workdir / "config.yaml", shared_cache)
    result = run_snakemake(workdir, "--cores", "2", configfile=config, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, workdir / "results" / "search" / "out"


@pytest.mark.e2e
def test_study_ends_with_the_requested_trials_and_its_best_reaches_every_seed(searched):
    _, out = searched
    best = json.loads((out / "hpo" / "landslide" / "tiny" / "best.json").read_text())
    assert best["finished"] == 4 and best["counts"].get("COMPLETE", 0) + best["counts"].get("PRUNED", 0) == 4
    rows = list(csv.DictReader(open(out / "hpo" / "landslide" / "tiny" / "trials.csv")))
    assert sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows) == 4
    for seed in (0, 1):
        text = (out / "landslide" / "tiny" / f"seed{seed}" / "config.yaml").read_text()
        config = yaml.safe_load(text)
        assert config["optimizer"]["init_args"]["lr"] == pytest.approx(best["params"]["lr"])
        assert config["data"]["init_args"]["batch_size"] == best["params"]["batch_size"]
        assert config["model"]["init_args"]["freeze_backbone"] == best["params"]["freeze_backbone"]
        assert f"# Searched (best trial {best['number']})" in text
    for name in ("optimization_history.png", "param_importances.png"):
        assert (out / "hpo" / "landslide" / "tiny" / name).stat().st_size > 1000


@pytest.mark.e2e
def test_no_trial_read_the_reported_split(searched):
    workdir, out = searched
    from conftest import REPO  # noqa: F401  (the study lives in the run's scratch)

    storage = next((workdir / "scratch" / "search" / "hpo" / "landslide" / "tiny").glob("study.journal"))
    study = hpo.load_study("search/landslide/tiny", str(storage))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    for trial in finished:
        assert trial.user_attrs["reported_split_loaders_requested"] == 0
        assert trial.user_attrs["served_files_in_reported_split"] == 0
        splits = trial.user_attrs["splits"]
        assert splits["selection"]["label"] == TASKS["landslide"].selection_split
        assert splits["shared_selection_test"] == 0


@pytest.mark.e2e
def test_leaderboard_iqm_and_search_cost_are_written(searched):
    _, out = searched
    with open(out / "leaderboard.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == protocol.LEADERBOARD_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 and {r["Seed"] for r in rows} == {"0", "1"}
    assert all(r["n_trials"] == "4" and r["batch_size_selection"] == "optimized" for r in rows)
    assert all(r["dataset"] == "landslide" and r["Metric"] == "landslide_IoU" for r in rows)
    iqm = json.loads((out / "iqm.json").read_text())
    assert iqm["overall"][0]["model"] == "tiny" and "landslide" in iqm["bounds"]
    cost = {r["task"]: r for r in csv.DictReader(open(out / "cost.csv"))}
    assert "TOTAL search" in cost and float(cost["TOTAL search"]["wall_s"]) > 0
    assert "search landslide" in cost and cost["search landslide"]["status"].startswith("4 of")
    page = (out / "overview.html").read_text()
    assert "IQM across seeds (GEO-Bench-2)" in page and ">search<" in page
