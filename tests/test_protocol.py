"""GEO-Bench-2 statistics against hand-computed values and independent numpy computations on fixed
arrays, and the leaderboard CSV's exact columns."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import yaml

from geofm import protocol, render
from geofm.tasks import TASKS

BOOT = {"resamples": 2000, "seed": 7, "confidence": 0.95}
# Two tasks, one higher-is-better (IoU) and one lower-is-better (RMSE), two models.
SCORES = {
    ("landslide", "a"): [0.1, 0.2, 0.3, 0.4, 0.9],
    ("landslide", "b"): [0.2, 0.2, 0.2, 0.3, 0.5],
    ("biomass", "a"): [50.0, 52.0, 55.0],
    ("biomass", "b"): [40.0, 45.0, 60.0],
}
CELLS = [
    {"task": t, "model": m, "seed": s, "value": v} for (t, m), values in SCORES.items() for s, v in enumerate(values)
]


def test_iqm_is_the_25_percent_trimmed_mean():
    assert protocol.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # int(5/4) = 1 cut each end: mean(2, 3, 4)
    assert protocol.iqm([4, 1, 3, 2]) == pytest.approx(2.5)  # mean(2, 3)
    assert protocol.iqm([1, 2, 3, 4, 5, 6, 7, 80]) == pytest.approx(4.5)  # 2 cut each end: mean(3..6)
    assert protocol.iqm([0.7]) == pytest.approx(0.7)


def test_normalisation_bounds_and_flipped_lower_is_better():
    bounds = protocol.normalisation_bounds(CELLS)
    assert bounds["landslide"] == {"metric": "landslide_IoU", "min": 0.1, "max": 0.9, "higher_is_better": True,
                                   "source": "experiment"}  # fmt: skip
    assert bounds["biomass"]["min"] == 40.0 and bounds["biomass"]["max"] == 60.0
    assert not bounds["biomass"]["higher_is_better"]
    assert protocol.normalise(0.3, bounds["landslide"]) == pytest.approx(0.25)  # (0.3 - 0.1) / 0.8
    assert protocol.normalise(45.0, bounds["biomass"]) == pytest.approx(0.75)  # (60 - 45) / 20: lower is better
    assert protocol.normalise(40.0, bounds["biomass"]) == 1.0 and protocol.normalise(60.0, bounds["biomass"]) == 0.0
    given = protocol.normalisation_bounds(CELLS, {"biomass": (0.0, 100.0)})
    assert given["biomass"]["source"] == "given" and protocol.normalise(45.0, given["biomass"]) == pytest.approx(0.55)
    assert protocol.normalise(1.0, {"min": 1.0, "max": 1.0, "higher_is_better": True}) is None


def _independent_bootstrap(groups: dict, boot: dict) -> tuple[float, float]:
    """The documented algorithm written as a plain loop: per repeat block, tasks in sorted order,
    a (resamples x seeds) index matrix each; pooled, sorted, trimmed by int(n / 4) each end."""
    rng = np.random.default_rng(boot["seed"])
    draws = {t: rng.integers(0, len(groups[t]), size=(boot["resamples"], len(groups[t]))) for t in sorted(groups)}
    stats = []
    for r in range(boot["resamples"]):
        pooled = sorted(v for t in sorted(groups) for v in np.asarray(groups[t])[draws[t][r]])
        k = len(pooled) // 4
        stats.append(np.mean(pooled[k : len(pooled) - k]))
    alpha = (1 - boot["confidence"]) / 2
    return tuple(np.quantile(stats, [alpha, 1 - alpha]))


def test_stratified_bootstrap_matches_an_independent_loop_and_resamples_within_tasks():
    tables = protocol.iqm_tables(CELLS, BOOT)
    bounds = tables["bounds"]
    norm = {
        (t, m): [protocol.normalise(v, bounds[t]) for v in values] for (t, m), values in SCORES.items()
    }  # fmt: skip
    for model in ("a", "b"):
        groups = {t: norm[(t, model)] for t in ("biomass", "landslide")}
        row = next(r for r in tables["overall"] if r["model"] == model)
        pooled = sorted(v for g in groups.values() for v in g)  # 8 values: 2 cut each end
        assert row["iqm_normalised"] == pytest.approx(np.mean(pooled[2:6]), abs=1e-6)
        lo, hi = _independent_bootstrap(groups, BOOT)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
        assert row["tasks"] == 2 and row["values"] == 8
    # Per task x model: IQM of the raw values (3 values: int(3 / 4) = 0 cut, the plain mean).
    row = next(r for r in tables["per_task"] if (r["task"], r["model"]) == ("biomass", "a"))
    assert row["iqm"] == pytest.approx((50 + 52 + 55) / 3, abs=1e-6) and row["metric"] == "RMSE"
    row = next(r for r in tables["per_task"] if (r["task"], r["model"]) == ("landslide", "a"))
    assert row["iqm"] == pytest.approx(0.3) and row["iqm_normalised"] == pytest.approx(0.25)
    # Stratified: seeds are resampled within each task, never across. Two tasks with no spread
    # within either give a zero-width interval although their values differ.
    flat = protocol.stratified_bootstrap_iqm({"t1": [0.2, 0.2, 0.2], "t2": [0.9, 0.9, 0.9]}, BOOT)
    assert flat[0] == pytest.approx(flat[1])
    # One value per task: nothing to resample.
    assert protocol.stratified_bootstrap_iqm({"t1": [0.2], "t2": [0.5]}, BOOT) is None


def test_bootstrap_interval_covers_the_exact_bootstrap_distribution():
    """Enumerate every stratified resample of a 2-task x 3-seed array (27 x 27 equally likely):
    the Monte-Carlo interval's ends sit at the exact distribution's 2.5% and 97.5% points."""
    groups = {"t1": [0.1, 0.5, 0.6], "t2": [0.3, 0.8, 0.95]}
    exact = []
    for i in itertools.product(range(3), repeat=3):
        for j in itertools.product(range(3), repeat=3):
            exact.append(protocol.iqm([groups["t1"][k] for k in i] + [groups["t2"][k] for k in j]))
    exact = np.array(exact)
    lo, hi = protocol.stratified_bootstrap_iqm(groups, {"resamples": 20000, "seed": 1, "confidence": 0.95})
    assert np.mean(exact < lo - 1e-9) <= 0.025 + 0.01 and np.mean(exact <= lo + 1e-9) >= 0.025 - 0.01
    assert np.mean(exact > hi + 1e-9) <= 0.025 + 0.01 and np.mean(exact >= hi - 1e-9) >= 0.025 - 0.01


def test_probability_of_improvement_matches_hand_counts():
    # landslide (higher is better): pairs where a > b count 1, ties 1/2:
    # a=0.1: 0; a=0.2: three ties -> 1.5; a=0.3: 3 + one tie -> 3.5; a=0.4: 4; a=0.9: 5 => 14 / 25
    # biomass (lower is better): a in {50, 52, 55} beats b only where b = 60: 3 of 9 pairs.
    result = protocol.improvement_between(CELLS, "a", "b")
    assert result["per_task"] == {"biomass": pytest.approx(3 / 9), "landslide": pytest.approx(14 / 25)}
    assert result["probability"] == pytest.approx((3 / 9 + 14 / 25) / 2) and result["tasks"] == 2
    same = protocol.probability_of_improvement({"t": [0.3, 0.4]}, {"t": [0.3, 0.4]})
    assert same["probability"] == pytest.approx(0.5)
    reverse = protocol.improvement_between(CELLS, "b", "a")
    assert reverse["per_task"]["landslide"] == pytest.approx(1 - 14 / 25)


def _rendered(task: str, **changes) -> dict:
    """A task's bundled recipe with its placeholders filled as the finetune rule would."""
    recipe = yaml.safe_load(TASKS[task].recipe.read_text())
    variables = {"backbone": "prithvi_eo_v2_300", "pretrained": True, "ckpt_path": None,
                 "neck_indices": [5, 11, 17, 23], "seed": 0, "data_root": "d", "run_dir": "r", "splits_dir": "s"}  # fmt: skip
    config = render.substitute(recipe, variables)
    for dotted, value in changes.items():
        render.set_path(config, dotted, value)
    return config


def test_leaderboard_csv_has_exactly_the_columns_in_order_and_one_row_per_cell(tmp_path):
    with_early_stop = _rendered("landslide", **{"model.init_args.freeze_backbone": True})
    with_early_stop["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/loss", "patience": 20},
        }
    )
    no_weight_decay = _rendered("biomass", **{"optimizer.init_args.lr": 3.0e-4, "data.init_args.batch_size": 16})
    no_weight_decay["optimizer"]["init_args"].pop("weight_decay", None)
    cells = []
    for seed in (0, 1):
        cells.append({"task": "landslide", "model": "p300", "seed": seed, "metric": "landslide_IoU", "value": 0.5 + seed,
                      "backbone": "prithvi_eo_v2_300", "config": with_early_stop, "n_trials": 16,
                      "batch_size_searched": True})  # fmt: skip
        cells.append({"task": "biomass", "model": "p300", "seed": seed, "metric": "RMSE", "value": 50.0 + seed,
                      "backbone": "prithvi_eo_v2_300", "config": no_weight_decay, "n_trials": 0,
                      "batch_size_searched": False})  # fmt: skip
    rows = protocol.leaderboard_rows(cells, "geobench2")
    path = tmp_path / "results_and_parameters.csv"
    protocol.write_leaderboard(rows, path)
    header = path.read_text().splitlines()[0]
    assert header == (
        "dataset,Metric,experiment_name,partition name,backbone,decoder,batch_size_selection,frozen_or_full_ft,"
        "early_stop_patience,n_trials,Seed,data_percentages,batch_size,weight_decay,lr,test metric"
    )
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(cells) == 4
    assert {(r["dataset"], r["Seed"]) for r in read} == {(t, str(s)) for t in ("landslide", "biomass") for s in (0, 1)}
    land = next(r for r in read if r["dataset"] == "landslide" and r["Seed"] == "1")
    assert land["Metric"] == "landslide_IoU" and land["test metric"] == "1.5"
    assert land["experiment_name"] == "geobench2_p300" and land["backbone"] == "prithvi_eo_v2_300"
    assert land["decoder"] == "UperNetDecoder" and land["frozen_or_full_ft"] == "frozen"
    assert land["early_stop_patience"] == "20" and land["n_trials"] == "16"
    assert land["batch_size_selection"] == "optimized" and land["data_percentages"] == "100"
    recipe_optim = yaml.safe_load(TASKS["landslide"].recipe.read_text())["optimizer"]["init_args"]
    assert float(land["lr"]) == recipe_optim["lr"] and float(land["weight_decay"]) == recipe_optim["weight_decay"]
    bio = next(r for r in read if r["dataset"] == "biomass")
    assert bio["frozen_or_full_ft"] == "full_ft" and bio["early_stop_patience"] == ""
    assert bio["batch_size_selection"] == "fixed" and bio["batch_size"] == "16" and float(bio["lr"]) == 3.0e-4
    optimizer = no_weight_decay["optimizer"]["class_path"]
    assert optimizer.endswith("AdamW") and float(bio["weight_decay"]) == 0.01  # torch's AdamW default


def test_protocol_module_docstring_explains_every_leaderboard_column():
    doc = protocol.leaderboard_rows.__doc__
    for column in protocol.LEADERBOARD_COLUMNS:
        assert column in doc, f"{column} is not explained in leaderboard_rows' docstring"
