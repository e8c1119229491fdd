"""The experiment's tables across cells: statistics across seeds, ranking, per-class scores and
the cost ledger, each as CSV (and Markdown where a paper or README wants it), at the paths the
results layout gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from geofm import ledger, stats
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


def write_cost(layout: ResultsLayout, summary_rows: list[dict]) -> dict:
    """cost.csv and cost.md; returns the TOTAL row."""
    rows = ledger.ledger(summary_rows)
    write_csv(layout.table("cost.csv"), rows, ledger.COLUMNS)
    Path(layout.table("cost.md")).write_text(markdown(rows, ledger.COLUMNS))
    return rows[-1]
