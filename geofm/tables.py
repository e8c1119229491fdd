"""The experiment's tables across cells: statistics across seeds, ranking, per-class scores and
the cost ledger, each as CSV (and Markdown where a paper or README wants it), at the paths the
results layout gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from geofm import ledger, protocol, stats
from geofm.formatting import markdown
from geofm.layout import ResultsLayout
from geofm.tasks import TASKS

AGGREGATE_COLUMNS = [
    "task", "model", "metric", "seeds", "mean", "std", "ci_low", "ci_high", "ci_note", "reference",
    "delta_to_reference", "within_tolerance", "leaky",
]  # fmt: skip


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or (list(rows[0]) if rows else ["empty"]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def cell_metrics(layout: ResultsLayout, cells) -> list[dict]:
    """Pinned metrics and the leak mark of every cell that finished."""
    found = []
    for cell in cells:
        path = Path(layout.cell_file("metrics.json", *cell))
        if path.is_file():
            metrics = json.loads(path.read_text())
            leaky = (metrics.get("splits") or {}).get("leaky")
            found.append({**cell._asdict(), "metrics": metrics["pinned"], "leaky": leaky})
    return found


def per_class(rows: list[dict]) -> list[dict]:
    """Per-class IoU and accuracy, mean and std across seeds, of the segmentation tasks."""
    table = []
    for task, spec in TASKS.items():
        for name in spec.class_names:
            for model in sorted({r["model"] for r in rows if r["task"] == task}):
                found = {r["metric"]: r for r in rows if r["task"] == task and r["model"] == model}
                iou, acc = found.get(f"IoU_{name}"), found.get(f"Acc_{name}")
                if iou or acc:
                    table.append({
                        "task": task, "class": name, "model": model, "seeds": (iou or acc)["seeds"],
                        "IoU_mean": iou and iou["mean"], "IoU_std": iou and iou["std"],
                        "Acc_mean": acc and acc["mean"], "Acc_std": acc and acc["std"],
                    })  # fmt: skip
    return table


def write_aggregate(layout: ResultsLayout, cells, bootstrap: dict, references: dict) -> dict:
    """aggregate.csv|json|md, ranking.csv|md, per_class.csv; returns the aggregate document."""
    finished = cell_metrics(layout, cells)
    rows = stats.aggregate(finished, bootstrap, references)
    ranking = stats.ranking(rows)
    write_csv(layout.table("aggregate.csv"), rows, AGGREGATE_COLUMNS)
    headline = [r for r in rows if r["headline"]]
    Path(layout.table("aggregate.md")).write_text(
        "Headline metrics across seeds (mean, std, bootstrap interval).\n\n" + markdown(headline, AGGREGATE_COLUMNS)
    )
    write_csv(layout.table("ranking.csv"), ranking)
    rank_cols = ["overall_rank", "model", "mean_rank", "tasks"] + [f"rank_{t}" for t in TASKS]
    Path(layout.table("ranking.md")).write_text(stats.RANKING_RULE + "\n\n" + markdown(ranking, rank_cols))
    write_csv(layout.table("per_class.csv"), per_class(rows))
    document = {
        "bootstrap": bootstrap,
        "ranking_rule": stats.RANKING_RULE,
        "definitions": {t: TASKS[t].definitions for t in sorted({c["task"] for c in finished})},
        "rows": rows,
        "ranking": ranking,
    }
    Path(layout.table("aggregate.json")).write_text(json.dumps(document, indent=2))
    return document


def searches(layout: ResultsLayout, cells) -> list[dict]:
    """The hyperparameter search of each task x model that has one (hpo_best's best.json)."""
    found = []
    for task, model in dict.fromkeys((c.task, c.model) for c in cells):
        path = Path(layout.hpo_file("best.json", task, model))
        if path.is_file():
            found.append({"task": task, "model": model, **json.loads(path.read_text())})
    return found


def write_cost(layout: ResultsLayout, summary_rows: list[dict], studies: list[dict]) -> dict:
    """cost.csv and cost.md; returns {"seeds": the cells' TOTAL row, "search": the search's or None}."""
    rows = ledger.ledger(summary_rows, studies)
    write_csv(layout.table("cost.csv"), rows, ledger.COLUMNS)
    Path(layout.table("cost.md")).write_text(markdown(rows, ledger.COLUMNS))
    totals = {r["task"]: r for r in rows if r["task"].startswith("TOTAL")}
    return {"seeds": totals["TOTAL"], "search": totals.get("TOTAL search")}


PER_TASK_IQM = ["task", "model", "metric", "seeds", "iqm", "ci_low", "ci_high", "iqm_normalised", "normalised_ci_low",
                "normalised_ci_high", "note", "leaky"]  # fmt: skip


def write_protocol(layout: ResultsLayout, cells, bootstrap: dict, experiment: str, studies: list[dict]) -> dict:
    """The GEO-Bench-2 view (geofm/protocol.py): iqm.csv|json (per task x model and overall, with
    stratified bootstrap intervals and the normalisation bounds), improvement.csv (probability of
    improvement of each model over each other) and leaderboard.csv (the submission format)."""
    finished = []
    for cell in cell_metrics(layout, cells):
        task = TASKS[cell["task"]]
        value = cell["metrics"].get(task.headline)
        if value is not None:
            finished.append({**cell, "metric": task.headline, "value": value})
    tables = protocol.iqm_tables(finished, bootstrap)
    leaky = {(c["task"], c["model"]) for c in finished if c.get("leaky")}
    for row in tables["per_task"]:
        row["leaky"] = stats.LEAKY if (row["task"], row["model"]) in leaky else ""
    for row in tables["overall"]:
        row["leaky"] = stats.LEAKY if any(m == row["model"] for _, m in leaky) else ""
    overall = [  # pooled over tasks: only normalised scores (their interval in the normalised columns)
        {"scope": "overall", "task": "(all)", "model": r["model"], "seeds": r["values"], "tasks": r["tasks"],
         "iqm_normalised": r["iqm_normalised"], "normalised_ci_low": r["ci_low"], "normalised_ci_high": r["ci_high"],
         "note": r["note"], "leaky": r["leaky"]}
        for r in tables["overall"]
    ]  # fmt: skip
    per_task = [{"scope": "task", "tasks": 1, **r} for r in tables["per_task"]]
    write_csv(layout.table("iqm.csv"), per_task + overall, ["scope", *PER_TASK_IQM[:3], "tasks", *PER_TASK_IQM[3:]])
    Path(layout.table("iqm.json")).write_text(json.dumps({**tables, "bootstrap": bootstrap}, indent=2))
    models = sorted({c["model"] for c in finished})
    improvement = [protocol.improvement_between(finished, x, y) for x in models for y in models if x != y]
    write_csv(layout.table("improvement.csv"), [{k: r[k] for k in ("x", "y", "probability", "tasks")} for r in improvement],
              ["x", "y", "probability", "tasks"])  # fmt: skip
    search = {(s["task"], s["model"]): s for s in studies}
    rows = []
    for c in finished:
        config = yaml.safe_load(Path(layout.cell_file("config.yaml", c["task"], c["model"], c["seed"])).read_text())
        found = search.get((c["task"], c["model"]))
        name = f"{c['model']}_{stats.LEAKY}" if c.get("leaky") else c["model"]
        rows.append({**c, "model": name, "config": config, "n_trials": found["finished"] if found else 0,
                     "batch_size_searched": bool(found and "batch_size" in found.get("space", {}))})  # fmt: skip
    protocol.write_leaderboard(protocol.leaderboard_rows(rows, experiment), layout.table("leaderboard.csv"))
    return tables
