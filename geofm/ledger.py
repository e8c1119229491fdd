"""The cost ledger: per cell and in total, time, device-hours, memory and energy, and the
headline metric per device-hour (GPU-hours where a GPU ran, else CPU-hours)."""

from __future__ import annotations

from geofm.tasks import TASKS

COLUMNS = [
    "task", "model", "seed", "status", "wall_s", "cpu_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_memory_mb",
    "energy_j", "device", "headline_metric", "headline", "device_hours", "headline_per_device_hour",
]  # fmt: skip


def ledger(summary_rows: list[dict], searches: list[dict] | None = None) -> list[dict]:
    """Per cell, the seeds' TOTAL, then (with a hyperparameter search) one row per task x model's
    study and the search's TOTAL. searches: {task, model, cost} (geofm.hpo.cost)."""
    rows = []
    for r in summary_rows:
        wall = sum(v for v in (r.get("finetune_wall_s"), r.get("evaluate_wall_s")) if v is not None)
        device_hours = r.get("gpu_hours") or r.get("cpu_hours")
        headline = r.get("headline")
        rows.append({
            "task": r["task"], "model": r["model"], "seed": r["seed"], "status": r["status"],
            "wall_s": round(wall, 3), "cpu_hours": r.get("cpu_hours"), "gpu_hours": r.get("gpu_hours"),
            "peak_rss_mb": r.get("peak_rss_mb"), "peak_gpu_memory_mb": r.get("peak_gpu_memory_mb"),
            "energy_j": r.get("energy_j"), "device": r.get("device"),
            "headline_metric": TASKS[r["task"]].headline, "headline": headline,
            "device_hours": device_hours,
            "headline_per_device_hour": round(headline / device_hours, 6) if headline is not None and device_hours else None,
        })  # fmt: skip
    rows.append(total(rows))
    studies = [search_row(s) for s in searches or []]
    if studies:
        rows += studies + [{**total(studies), "task": "TOTAL search", "status": f"{len(studies)} studies"}]
    return rows


def search_row(search: dict) -> dict:
    cost = search["cost"]
    return {
        **dict.fromkeys(COLUMNS), "task": f"search {search['task']}", "model": search["model"], "seed": "",
        "status": f"{cost['finished']} of {cost['trials']} trials finished", "wall_s": cost["wall_s"],
        "cpu_hours": cost["cpu_hours"], "gpu_hours": cost["gpu_hours"],
        "device_hours": cost["gpu_hours"] or cost["cpu_hours"],
    }  # fmt: skip


def total(rows: list[dict]) -> dict:
    def add(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(values), 6) if values else None

    peaks = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
    return {
        "task": "TOTAL", "model": "", "seed": "", "status": f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok",
        "wall_s": add("wall_s"), "cpu_hours": add("cpu_hours"), "gpu_hours": add("gpu_hours"),
        "peak_rss_mb": max(peaks) if peaks else None, "peak_gpu_memory_mb": None, "energy_j": add("energy_j"),
        "device": "", "headline_metric": "", "headline": None, "device_hours": add("device_hours"),
        "headline_per_device_hour": None,
    }  # fmt: skip
