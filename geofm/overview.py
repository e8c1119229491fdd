"""The report's front page: headline results, ranking, cost total and one prediction per task,
as a self-contained HTML fragment that report/workflow.rst includes, so a reviewer sees the
answer without clicking through categories."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from geofm import formatting
from geofm.stats import RANKING_RULE
from geofm.tasks import TASKS


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    def cell(v):
        return html.escape(formatting.value(v))

    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    # Scrolls inside the report's narrow description column instead of running under its graph.
    return f'<div style="overflow-x:auto"><table class="geofm-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(path: Path, alt: str, width: int = 900) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" style="max-width:{width}px;width:100%" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def build(
    experiment: str,
    description: str,
    aggregate: dict,
    summary: dict,
    cost_total: dict,
    curves: dict[str, Path],
    predictions: dict[str, Path],
) -> str:
    headline = []
    for r in aggregate["rows"]:
        if r["headline"]:
            interval = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if r["ci_low"] is not None else r["ci_note"]
            reference = ""
            if r["reference"] is not None:
                ok = "within tolerance" if r["within_tolerance"] else "OUTSIDE tolerance"
                reference = f"{r['reference']:.4g} (Δ {r['delta_to_reference']:+.3g}, {ok})"
            mean_std = f"{r['mean']:.4g} ± {r['std']:.2g}" if r["std"] is not None else f"{r['mean']:.4g}"
            headline.append({**r, "mean_std": mean_std, "interval": interval, "reference_check": reference})
    measured: dict[str, set] = {}
    for row in summary["rows"]:  # the labels the jobs measured (geofm.splits), not assumed
        if row.get("test_split"):
            measured.setdefault(row["task"], set()).add((row["test_split"], row.get("selection_split") or ""))
    splits = "; ".join(
        f"{task}: reported on {test}, checkpoint selected on {selection}"
        for task, labels in measured.items()
        for test, selection in sorted(labels)
    )
    leaky = sorted({f"{r['task']}/{r['model']}" for r in headline if r.get("leaky")})
    failed = [f"{r['task']}/{r['model']}/seed{r['seed']}" for r in summary["rows"] if r["status"] != "ok"]
    parts = [
        '<div class="geofm-overview">',
        # Snakemake's report gives this page a 32rem column beside its rule graph: widen it so the
        # tables fit (they scroll inside it where they still do not).
        "<style>.prose.max-w-lg{max-width:52rem}.geofm-table{border-collapse:collapse;margin:8px 0}.geofm-table td,.geofm-table th{border:1px solid #bbb;padding:3px 6px;font-size:13px;white-space:nowrap}.geofm-table th{background:#eee}</style>",
        f"<h2>Experiment {html.escape(experiment)}</h2>",
        f"<p>{html.escape(description)}</p>" if description else "",
        f"<p><b>{summary['cells'] - len(failed)} of {summary['cells']} cells finished</b>"
        + (f"; not finished: {html.escape(', '.join(failed))}" if failed else "")
        + "</p>",
        "<h3>Headline metrics across seeds</h3>",
        _table(
            headline,
            [
                ("task", "task"),
                ("model", "model"),
                ("metric", "metric"),
                ("seeds", "seeds"),
                ("mean_std", "mean ± std"),
                ("interval", "95% bootstrap interval"),
                ("reference_check", "reference"),
                ("leaky", "splits"),
            ],
        ),  # fmt: skip
        (
            f'<p style="color:#b00"><b>LEAKY</b>: the checkpoints of {html.escape(", ".join(leaky))} were selected '
            "on chips that are also reported (allowed by allow_selection_on_reported_split): their scores are "
            "optimistic and not comparable.</p>"
            if leaky
            else ""
        ),
        f"<p>Splits: {html.escape(splits)}.</p>",
        "<h3>Ranking</h3>",
        f"<p>{html.escape(RANKING_RULE)}</p>",
        _table(
            aggregate["ranking"],
            [("overall_rank", "rank"), ("model", "model"), ("mean_rank", "mean rank")]
            + [(f"rank_{t}", t) for t in TASKS],
        ),
        "<h3>Cost</h3>",
        _table(
            [cost_total],
            [
                ("wall_s", "wall time (s)"),
                ("cpu_hours", "CPU-hours"),
                ("gpu_hours", "GPU-hours"),
                ("energy_j", "energy (J)"),
                ("peak_rss_mb", "peak memory (MB)"),
            ],
        ),
        "<h3>Sample predictions</h3>",
        *[_image(p, f"{task}: {p.parent.parent.name} / {p.parent.name} / {p.stem}") for task, p in predictions.items()],
        "<h3>Learning curves</h3>",
        *[_image(p, f"{task} learning curves") for task, p in curves.items()],
        "<p>All tables, per-class scores, every prediction, the cost ledger and the provenance manifest are in the categories on the left.</p>",
        "</div>",
    ]
    return "\n".join(parts)


def write(layout, experiment: dict, cells, aggregate: dict, summary: dict, cost_total: dict, lock: dict) -> Path:
    """out/overview.html: the front page, with one prediction plot per task (the first model's
    first seed that has one) and each task's learning curves."""
    predictions, curves = {}, {}
    for task in dict.fromkeys(c.task for c in cells):
        for c in (c for c in cells if c.task == task):
            pngs = sorted(Path(layout.predictions_dir(*c)).glob("*.png"))
            if pngs:
                predictions[task] = pngs[0]
                break
        if Path(layout.curves_plot(task)).is_file():
            curves[task] = Path(layout.curves_plot(task))
    numbers = {k: v for k, v in cost_total.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    page = build(
        experiment["experiment"], experiment.get("description", ""), aggregate, summary, numbers, curves, predictions
    )
    if lock.get("drift"):  # the run's software is not what uv.lock says: say so at the top
        drifted = ", ".join(f"{d['name']} {d['installed']} (locked {d['locked']})" for d in lock["drift"])
        warning = (
            f'<p style="color:#b00"><b>Software differs from uv.lock</b>: {html.escape(drifted)}. '
            "Results may not reproduce from the lock; see manifest.json.</p>"
        )
        page = page.replace("<h3>Headline metrics", warning + "<h3>Headline metrics", 1)
    out = Path(layout.table("overview.html"))
    out.write_text(page)
    return out
