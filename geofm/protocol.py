"""GEO-Bench-2 aggregation: per-task min-max normalisation, the interquartile mean (IQM) across
seeds with a bootstrap stratified by task, the probability of improvement, and the leaderboard's
submission CSV.

Definitions (rliable's, as GEO-Bench-2 uses them):
- IQM: the 25% trimmed mean (`rliable.metrics.aggregate_iqm`, scipy's trim_mean with 0.25: of n
  values, int(n / 4) are cut from each end).
- Normalised score of a task's headline value v with bounds (lo, hi): (v - lo) / (hi - lo), or
  (hi - v) / (hi - lo) for a lower-is-better metric, so that 1 is always the best. The bounds are
  the task's lowest and highest value over every model and seed of the experiment unless fixed
  bounds are given (e.g. the leaderboard's normalizer); they are returned to be written out.
- Overall IQM of a model: the IQM of its normalised scores pooled over tasks and seeds.
- Stratified bootstrap (rliable's StratifiedBootstrap without task resampling; GEO-Bench-2's
  `bootstrap_iqm_aggregate`): each repeat resamples, with replacement, the seeds within each task
  (as many as the task has), pools them and takes the IQM; the interval is the percentile
  interval of the repeats. Drawn from numpy's Generator seeded with `bootstrap["seed"]`: for each
  repeat block, tasks in sorted order, a (resamples x seeds) index matrix per task. rliable's own
  bootstrap (rliable.library) is not used: it draws from numpy's global RNG whatever random_state
  it is given, and it does not import with the arch and pandas versions installed here.
- Probability of improvement of X over Y: per task, P(X > Y) + P(X = Y) / 2 over all pairs of a
  seed of X and a seed of Y (the Mann-Whitney U statistic over n_x * n_y;
  `rliable.metrics.probability_of_improvement`), averaged over the tasks both were run on.
"""

from __future__ import annotations

import csv
import importlib
import inspect
from collections import defaultdict
from pathlib import Path

import numpy as np
from rliable import metrics as rly
from scipy.stats import trim_mean

from geofm.tasks import TASKS

TRIM = 0.25
ONE_SEED = "1 value: no interval"
LEADERBOARD_COLUMNS = [
    "dataset", "Metric", "experiment_name", "partition name", "backbone", "decoder", "batch_size_selection",
    "frozen_or_full_ft", "early_stop_patience", "n_trials", "Seed", "data_percentages", "batch_size",
    "weight_decay", "lr", "test metric",
]  # fmt: skip


def iqm(values) -> float:
    return float(rly.aggregate_iqm(np.asarray(values, dtype=float)))


def _round(x):
    return None if x is None else round(float(x), 6)


# ---------------------------------------------------------------------------------- normalisation
def normalisation_bounds(cells: list[dict], given: dict | None = None) -> dict:
    """{task: {metric, min, max, higher_is_better, source}} from every cell's headline `value`
    (source 'experiment'), or the given {task: (min, max)} (source 'given')."""
    values: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        values[c["task"]].append(float(c["value"]))
    bounds = {}
    for task, vals in sorted(values.items()):
        lo, hi = (given or {}).get(task) or (min(vals), max(vals))
        bounds[task] = {
            "metric": TASKS[task].headline,
            "min": float(lo),
            "max": float(hi),
            "higher_is_better": TASKS[task].higher_is_better,
            "source": "given" if task in (given or {}) else "experiment",
        }
    return bounds


def normalise(value: float, bound: dict) -> float | None:
    """1 = best, 0 = worst of the bounds; None when the bounds are equal (nothing to scale by)."""
    span = bound["max"] - bound["min"]
    if span == 0:
        return None
    return (value - bound["min"]) / span if bound["higher_is_better"] else (bound["max"] - value) / span


# ---------------------------------------------------------------------------------- bootstrap
def stratified_bootstrap_iqm(groups: dict[str, list[float]], bootstrap: dict) -> tuple[float, float] | None:
    """Percentile interval of the IQM of values pooled over groups (tasks), each repeat resampling
    seeds within each group; None when no group has two values (nothing to resample)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in groups.items() if len(v)}
    if not arrays or max(len(a) for a in arrays.values()) < 2:
        return None
    rng = np.random.default_rng(bootstrap["seed"])
    reps = int(bootstrap["resamples"])
    pooled = np.concatenate(
        [arrays[k][rng.integers(0, len(arrays[k]), size=(reps, len(arrays[k])))] for k in sorted(arrays)], axis=1
    )
    stats = trim_mean(pooled, TRIM, axis=1)
    alpha = (1 - bootstrap["confidence"]) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def iqm_tables(cells: list[dict], bootstrap: dict, bounds: dict | None = None) -> dict:
    """The IQM per task x model and overall per model, with stratified bootstrap intervals.

    cells: one dict per finished cell: task, model, seed, value (the task's headline metric).
    bootstrap: {resamples, seed, confidence} (GEO-Bench-2 uses 100 repeats).
    bounds: fixed normalisation bounds {task: (min, max)}; default: from the cells.
    Returns {"per_task": rows, "overall": rows, "bounds": {task: {...}}}. Per task: IQM of the
    raw values with its interval, and of the normalised values with theirs. Overall: IQM of the
    normalised values pooled over tasks (tasks whose bounds are equal are left out and named).
    """
    bound = normalisation_bounds(cells, bounds)
    raw: dict[tuple[str, str], list[float]] = defaultdict(list)
    for c in cells:
        raw[(c["task"], c["model"])].append(float(c["value"]))
    per_task, pooled = [], defaultdict(dict)
    for (task, model), values in sorted(raw.items()):
        norm = [normalise(v, bound[task]) for v in values]
        ci = stratified_bootstrap_iqm({task: values}, bootstrap)
        ok = None not in norm
        nci = stratified_bootstrap_iqm({task: norm}, bootstrap) if ok else None
        if ok:
            pooled[model][task] = norm
        per_task.append({
            "task": task, "model": model, "metric": bound[task]["metric"], "seeds": len(values),
            "iqm": _round(iqm(values)), "ci_low": _round(ci[0]) if ci else None, "ci_high": _round(ci[1]) if ci else None,
            "iqm_normalised": _round(iqm(norm)) if ok else None,
            "normalised_ci_low": _round(nci[0]) if nci else None, "normalised_ci_high": _round(nci[1]) if nci else None,
            "note": ("" if ci else ONE_SEED) if ok else "bounds equal: not normalised",
        })  # fmt: skip
    overall = []
    models = sorted({m for _, m in raw})
    for model in models:
        groups = pooled.get(model, {})
        values = [v for t in sorted(groups) for v in groups[t]]
        ci = stratified_bootstrap_iqm(groups, bootstrap)
        left_out = sorted({t for t, m in raw if m == model} - set(groups))
        overall.append({
            "model": model, "tasks": len(groups), "values": len(values),
            "iqm_normalised": _round(iqm(values)) if values else None,
            "ci_low": _round(ci[0]) if ci else None, "ci_high": _round(ci[1]) if ci else None,
            "note": "; ".join(filter(None, [
                "" if ci else ONE_SEED, f"left out (bounds equal): {', '.join(left_out)}" if left_out else "",
            ])),
        })  # fmt: skip
    return {"per_task": per_task, "overall": overall, "bounds": bound}


# ---------------------------------------------------------------------------------- improvement
def probability_of_improvement(x: dict[str, list[float]], y: dict[str, list[float]]) -> dict:
    """P(X > Y) over the tasks both have (values oriented so that higher is better, e.g. the
    normalised scores): {"probability", "per_task": {task: p}, "tasks"}."""
    per_task = {}
    for task in sorted(set(x) & set(y)):
        a = np.asarray(x[task], dtype=float)[:, None]
        b = np.asarray(y[task], dtype=float)[:, None]
        per_task[task] = float(rly.probability_of_improvement(a, b))
    probability = float(np.mean(list(per_task.values()))) if per_task else None
    return {"probability": probability, "per_task": per_task, "tasks": len(per_task)}


def improvement_between(cells: list[dict], model_x: str, model_y: str, bounds: dict | None = None) -> dict:
    """probability_of_improvement of model_x over model_y on the normalised headline scores."""
    bound = normalisation_bounds(cells, bounds)
    scores: dict[str, dict[str, list[float]]] = {model_x: defaultdict(list), model_y: defaultdict(list)}
    for c in cells:
        if c["model"] in scores:
            norm = normalise(float(c["value"]), bound[c["task"]])
            if norm is not None:
                scores[c["model"]][c["task"]].append(norm)
    return {"x": model_x, "y": model_y, **probability_of_improvement(scores[model_x], scores[model_y])}


# ---------------------------------------------------------------------------------- leaderboard
def _get(config: dict, dotted: str, default=None):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or node.get(key) is None:
            return default
        node = node[key]
    return node


def _early_stop_patience(config: dict):
    callbacks = _get(config, "trainer.callbacks", []) or []
    for cb in [callbacks] if isinstance(callbacks, dict) else callbacks:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).split(".")[-1] == "EarlyStopping":
            return (cb.get("init_args") or {}).get("patience", 3)  # Lightning's default patience
    return ""


def _optimizer_setting(config: dict, name: str):
    """The optimizer's setting as trained: the config's, else the optimizer class's default."""
    value = _get(config, f"optimizer.init_args.{name}")
    if value is not None:
        return value
    path = _get(config, "optimizer.class_path")
    if not path:
        return ""
    module, _, cls = path.rpartition(".")
    try:
        default = inspect.signature(getattr(importlib.import_module(module), cls)).parameters[name].default
    except (ImportError, AttributeError, KeyError, ValueError):
        return ""
    return "" if default is inspect.Parameter.empty else default


def leaderboard_rows(cells: list[dict], experiment: str) -> list[dict]:
    """Rows of the GEO-Bench-2 leaderboard submission CSV (`results_and_parameters.csv`), one per
    task x model x seed, columns LEADERBOARD_COLUMNS in order.

    cells: dicts with task, model, seed, metric (the headline metric's name), value (its test
    value), backbone, config (the cell's rendered TerraTorch config as a dict), n_trials (trials
    of the search that chose its settings; 0 without a search) and batch_size_searched (bool).

    How each column is filled:
    - dataset: the task name; Metric: the task's headline metric name (e.g. mIoU, RMSE);
      test metric: its value on the reported split, unnormalised.
    - experiment_name: "<experiment>_<model>" (the experiment and the model's name in the config).
    - partition name: "1.00x train" and data_percentages: 100 (every run trains on the whole
      training split).
    - backbone: the model's backbone name; decoder: model.init_args.model_args.decoder.
    - batch_size_selection: "optimized" when the search chose the batch size, else "fixed".
    - frozen_or_full_ft: "frozen" when model.init_args.freeze_backbone is true, else "full_ft".
    - early_stop_patience: the patience of an EarlyStopping callback in trainer.callbacks
      (Lightning's default 3 if it sets none); empty when there is no early stopping.
    - n_trials: the number of finished search trials (0 when the settings were not searched).
    - Seed: the cell's seed (seed_everything).
    - batch_size: data.init_args.batch_size (per step and device: gradient accumulation and
      several devices multiply it); lr, weight_decay: optimizer.init_args.lr / weight_decay, or
      the optimizer class's default when the config leaves them out.
    """
    rows = []
    for c in sorted(cells, key=lambda c: (c["task"], c["model"], c["seed"])):
        config = c["config"]
        rows.append({
            "dataset": c["task"], "Metric": c["metric"], "experiment_name": f"{experiment}_{c['model']}",
            "partition name": "1.00x train",
            "backbone": c.get("backbone") or _get(config, "model.init_args.model_args.backbone", ""),
            "decoder": _get(config, "model.init_args.model_args.decoder", ""),
            "batch_size_selection": "optimized" if c.get("batch_size_searched") else "fixed",
            "frozen_or_full_ft": "frozen" if _get(config, "model.init_args.freeze_backbone", False) else "full_ft",
            "early_stop_patience": _early_stop_patience(config), "n_trials": int(c.get("n_trials") or 0),
            "Seed": c["seed"], "data_percentages": 100, "batch_size": _get(config, "data.init_args.batch_size", ""),
            "weight_decay": _optimizer_setting(config, "weight_decay"), "lr": _optimizer_setting(config, "lr"),
            "test metric": c["value"],
        })  # fmt: skip
    return rows


def write_leaderboard(rows: list[dict], path: Path | str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
