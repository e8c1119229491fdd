"""Statistics across seeds: mean, standard deviation, seeded bootstrap confidence intervals,
a ranking across tasks, and the comparison of two experiments.

All intervals are percentile bootstraps over seeds (resampled with replacement), seeded so
that the same inputs always give the same interval.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from geofm.tasks import TASKS

RANKING_RULE = (
    "Models are ranked per task by the seed mean of the task's headline metric ("
    + "; ".join(f"{name} {t.headline}: {t.direction}" for name, t in TASKS.items())
    + "; ties share the mean rank); the overall rank orders models by the mean of their per-task "
    "ranks over the tasks they were evaluated on."
)
ONE_SEED = "1 seed: no interval"
LEAKY = "LEAKY"  # geofm.splits: the checkpoint was selected on chips that are also reported


def bootstrap_ci(values: list[float], resamples: int, seed: int, confidence: float) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None with fewer than two values."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_diff_ci(
    a: list[float], b: list[float], resamples: int, seed: int, confidence: float
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling each side's seeds."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 2 or len(y) < 2:
        return None
    rng = np.random.default_rng(seed)
    diffs = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1) - y[
        rng.integers(0, len(y), (resamples, len(y)))
    ].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _round(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def aggregate(cells: list[dict], bootstrap: dict, references: dict | None = None) -> list[dict]:
    """One row per task x model x metric over the seeds that finished.

    cells: dicts with task, model, seed, `metrics` (the pinned metrics of metrics.json) and
    `leaky` (the cell's checkpoint was selected on reported chips: every row of it says LEAKY).
    references: {model: {task: {metric, value, tolerance, source}}} from the config.
    """
    grouped: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    leaky = {(c["task"], c["model"]) for c in cells if c.get("leaky")}
    for cell in cells:
        for metric, value in (cell.get("metrics") or {}).items():
            if metric != "labelled_pixels" and value is not None:
                grouped[(cell["task"], cell["model"], metric)].append(float(value))
    rows = []
    for (task, model, metric), values in sorted(grouped.items()):
        ci = bootstrap_ci(values, bootstrap["resamples"], bootstrap["seed"], bootstrap["confidence"])
        row = {
            "task": task,
            "model": model,
            "metric": metric,
            "headline": metric == TASKS[task].headline,
            "seeds": len(values),
            "mean": _round(np.mean(values)),
            "std": _round(np.std(values, ddof=1)) if len(values) > 1 else None,
            "ci_low": _round(ci[0]) if ci else None,
            "ci_high": _round(ci[1]) if ci else None,
            "ci_note": "" if ci else ONE_SEED,
            "reference": None,
            "delta_to_reference": None,
            "within_tolerance": None,
            "leaky": LEAKY if (task, model) in leaky else "",
        }
        ref = ((references or {}).get(model) or {}).get(task)
        if ref and ref["metric"] == metric:
            row["reference"] = ref["value"]
            row["delta_to_reference"] = _round(row["mean"] - ref["value"])
            row["within_tolerance"] = abs(row["mean"] - ref["value"]) <= ref.get("tolerance", 0.02)
        rows.append(row)
    return rows


def ranking(rows: list[dict]) -> list[dict]:
    """Overall ranking from the aggregate rows' headline metrics (see RANKING_RULE)."""
    per_task: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["headline"] and row["mean"] is not None:
            per_task[row["task"]][row["model"]] = row["mean"]
    ranks: dict[str, dict[str, float]] = defaultdict(dict)
    for task, scores in per_task.items():
        sign = -1 if TASKS[task].higher_is_better else 1
        ordered = sorted(scores.items(), key=lambda kv: sign * kv[1])
        i = 0
        while i < len(ordered):  # ties share the mean of their positions
            j = i
            while j + 1 < len(ordered) and ordered[j + 1][1] == ordered[i][1]:
                j += 1
            for k in range(i, j + 1):
                ranks[ordered[k][0]][task] = (i + j) / 2 + 1
            i = j + 1
    table = []
    for model, by_task in ranks.items():
        table.append({
            "model": model,
            "mean_rank": round(sum(by_task.values()) / len(by_task), 3),
            "tasks": len(by_task),
            **{f"rank_{t}": by_task.get(t) for t in TASKS},
            **{f"{t}_{TASKS[t].headline}": per_task[t].get(model) for t in TASKS},
        })  # fmt: skip
    table.sort(key=lambda r: (r["mean_rank"], r["model"]))
    for i, row in enumerate(table, start=1):
        row["overall_rank"] = i
    return table


def compare(a_cells: list[dict], b_cells: list[dict], bootstrap: dict) -> list[dict]:
    """Per task x model x metric: mean(A) - mean(B) with a bootstrap interval; significant when
    the interval excludes zero. Only task x model x metric present on both sides are compared."""

    def by_key(cells):
        out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for c in cells:
            for metric, value in (c.get("metrics") or {}).items():
                if metric != "labelled_pixels" and value is not None:
                    out[(c["task"], c["model"], metric)].append(float(value))
        return out

    a, b = by_key(a_cells), by_key(b_cells)
    rows = []
    for key in sorted(set(a) & set(b)):
        task, model, metric = key
        ci = bootstrap_diff_ci(a[key], b[key], bootstrap["resamples"], bootstrap["seed"], bootstrap["confidence"])
        diff = float(np.mean(a[key]) - np.mean(b[key]))
        rows.append({
            "task": task,
            "model": model,
            "metric": metric,
            "headline": metric == TASKS[task].headline,
            "mean_a": _round(np.mean(a[key])),
            "mean_b": _round(np.mean(b[key])),
            "seeds_a": len(a[key]),
            "seeds_b": len(b[key]),
            "difference": _round(diff),
            "ci_low": _round(ci[0]) if ci else None,
            "ci_high": _round(ci[1]) if ci else None,
            "significant": bool(ci and (ci[0] > 0 or ci[1] < 0)),
            "note": "" if ci else "fewer than 2 seeds on a side: no interval, never significant",
        })  # fmt: skip
    return rows
