"""out/summary.csv and out/summary.json: one row per cell with status, metrics and resources.

Written by the `summary` rule when every cell finished, and by the workflow's onerror
handler when some failed, so the failed cells are marked either way.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from geofm.config import Cell
from geofm.layout import ResultsLayout
from geofm.tasks import TASKS

COLUMNS = [
    "task", "model", "seed", "status", "headline_metric", "headline", "baseline", "beats_baseline",
    "metric_1", "value_1", "metric_2", "value_2", "metric_3", "value_3",
    "test_split", "selection_split", "leaky", "test_chips", "selection_chips", "shared_chips", "best_selection_score",
    "epochs",
    "finetune_wall_s", "evaluate_wall_s", "cpu_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_memory_mb",
    "gpu_utilisation_pct", "energy_j", "parameters", "train_samples_per_s", "device", "error", "err_file",
]  # fmt: skip


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _beats(task: str, value, baseline) -> bool | None:
    if value is None or baseline is None:
        return None
    return value > baseline if TASKS[task].higher_is_better else value < baseline


def cell_row(layout: ResultsLayout, cell: Cell) -> dict:
    spec = TASKS[cell.task]
    metrics = _load(Path(layout.cell_file("metrics.json", *cell)))
    finetune = _load(Path(layout.cell_file("finetune.json", *cell))) or {}
    evaluate = _load(Path(layout.cell_file("evaluate.json", *cell))) or {}
    baseline = _load(Path(layout.baseline(cell.task)))
    err = Path(layout.err_file(*cell))
    err = err if err.is_file() else None
    if err is not None:
        status = "failed"
    elif metrics is not None:
        status = "ok"
    else:
        status = "not run"
    pinned = (metrics or {}).get("pinned", {})
    headline = pinned.get(spec.headline)
    base = (baseline or {}).get("pinned", {}).get(spec.headline)
    gpu = finetune.get("gpu") or {}
    row = {
        "task": cell.task,
        "model": cell.model,
        "seed": cell.seed,
        "status": status,
        "headline_metric": spec.headline,
        "headline": headline,
        "baseline": base,
        "beats_baseline": _beats(cell.task, headline, base),
        **_split_columns(metrics, finetune),
        "best_selection_score": (finetune.get("selection") or {}).get("best_score"),
        "epochs": finetune.get("epochs"),
        "finetune_wall_s": finetune.get("wall_s"),
        "evaluate_wall_s": evaluate.get("wall_s"),
        "cpu_hours": _sum(finetune.get("cpu_hours"), evaluate.get("cpu_hours")),
        "gpu_hours": _sum(gpu.get("gpu_hours"), (evaluate.get("gpu") or {}).get("gpu_hours")),
        "peak_rss_mb": _max(finetune.get("peak_rss_mb"), evaluate.get("peak_rss_mb")),
        "peak_gpu_memory_mb": gpu.get("peak_memory_mb"),
        "gpu_utilisation_pct": gpu.get("mean_utilisation_pct"),
        "energy_j": _sum(gpu.get("energy_j"), (evaluate.get("gpu") or {}).get("energy_j")),
        "parameters": finetune.get("parameters"),
        "train_samples_per_s": finetune.get("train_samples_per_s"),
        "device": (finetune.get("runtime") or {}).get("device"),
        "error": _cause(err) if err else None,
        "err_file": str(err) if err else None,
    }
    for i, name in enumerate(spec.key_metrics, start=1):
        row[f"metric_{i}"], row[f"value_{i}"] = name, pinned.get(name)
    row["metrics"] = pinned
    return row


def _split_columns(metrics: dict | None, finetune: dict) -> dict:
    """The split labels as measured by the job that ran (evaluate, else fine-tune); empty for a
    cell that never got that far: labels are never assumed from the task."""
    facts = (metrics or {}).get("splits") or finetune.get("splits") or {}
    test, selection = facts.get("test") or {}, facts.get("selection") or {}
    return {
        "test_split": test.get("label", ""),
        "selection_split": selection.get("label", ""),
        "leaky": facts.get("leaky"),
        "test_chips": test.get("chips"),
        "selection_chips": selection.get("chips"),
        "shared_chips": facts.get("shared_selection_test"),
    }


def _sum(*values):
    present = [v for v in values if v is not None]
    return round(sum(present), 6) if present else None


def _max(*values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _cause(err: Path) -> str:
    for line in err.read_text(errors="replace").splitlines():
        if line.startswith("cause: "):
            return line[len("cause: ") :][:300]
    return "see error file"


def write(layout: ResultsLayout, cells: list[Cell], experiment: dict) -> dict:
    """out/summary.csv and out/summary.json of `cells`; returns the JSON document."""
    csv_path, json_path = Path(layout.table("summary.csv")), Path(layout.table("summary.json"))
    rows = [cell_row(layout, c) for c in cells]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "experiment": experiment["experiment"],
        "description": experiment.get("description", ""),
        "cells": len(rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "not_run": sum(r["status"] == "not run" for r in rows),
        "definitions": {t: TASKS[t].definitions for t in sorted({c.task for c in cells})},
        "rows": rows,
    }
    json_path.write_text(json.dumps(document, indent=2))
    return document
