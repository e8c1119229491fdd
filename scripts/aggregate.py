"""Rule aggregate: statistics across seeds, the ranking across tasks, per-class scores."""

import csv
import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm import stats
    from geofm.formatting import markdown
    from geofm.tasks import TASKS

    cells = []
    for (task, model, seed), path in zip(sm.params.cells, sm.input.metrics):
        metrics = json.loads(Path(path).read_text())
        leaky = (metrics.get("splits") or {}).get("leaky")
        cells.append({"task": task, "model": model, "seed": seed, "metrics": metrics["pinned"], "leaky": leaky})
    rows = stats.aggregate(cells, sm.params.bootstrap, sm.params.references)
    ranking = stats.ranking(rows)

    def write_csv(path, table):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["empty"])
            writer.writeheader()
            writer.writerows(table)

    columns = [
        "task",
        "model",
        "metric",
        "seeds",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "ci_note",
        "reference",
        "delta_to_reference",
        "within_tolerance",
        "leaky",
    ]
    write_csv(sm.output.csv, [{k: r[k] for k in columns} for r in rows])
    headline = [r for r in rows if r["headline"]]
    Path(sm.output.md).write_text(
        "Headline metrics across seeds (mean, std, bootstrap 95% interval).\n\n" + markdown(headline, columns)
    )
    write_csv(sm.output.ranking, ranking)
    rank_cols = ["overall_rank", "model", "mean_rank", "tasks"] + [f"rank_{t}" for t in TASKS]
    Path(sm.output.ranking_md).write_text(stats.RANKING_RULE + "\n\n" + markdown(ranking, rank_cols))

    per_class = []
    for task, spec in TASKS.items():
        for name in spec.class_names:
            for model in sorted({r["model"] for r in rows if r["task"] == task}):
                found = {r["metric"]: r for r in rows if r["task"] == task and r["model"] == model}
                iou, acc = found.get(f"IoU_{name}"), found.get(f"Acc_{name}")
                if iou or acc:
                    per_class.append({
                        "task": task, "class": name, "model": model, "seeds": (iou or acc)["seeds"],
                        "IoU_mean": iou and iou["mean"], "IoU_std": iou and iou["std"],
                        "Acc_mean": acc and acc["mean"], "Acc_std": acc and acc["std"],
                    })  # fmt: skip
    write_csv(sm.output.per_class, per_class)
    document = {
        "bootstrap": sm.params.bootstrap,
        "ranking_rule": stats.RANKING_RULE,
        "definitions": {t: TASKS[t].definitions for t in sorted({c["task"] for c in cells})},
        "rows": rows,
        "ranking": ranking,
    }
    Path(sm.output.json).write_text(json.dumps(document, indent=2))
