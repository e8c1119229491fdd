"""Rule overview: out/overview.html, the front page of `snakemake --report`."""

import csv
import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm.overview import build

    with open(sm.input.cost) as f:
        total = [r for r in csv.DictReader(f) if r["task"] == "TOTAL"][0]
    predictions = {}
    for task, folder in zip(sm.params.tasks, sm.input.predictions):
        pngs = sorted(Path(folder).glob("*.png"))
        if pngs:
            predictions[task] = pngs[0]
    page = build(
        sm.params.experiment,
        sm.params.description,
        json.loads(Path(sm.input.aggregate).read_text()),
        json.loads(Path(sm.input.summary).read_text()),
        {
            k: (float(v) if v not in ("", None) else None)
            for k, v in total.items()
            if k not in ("task", "model", "seed", "status", "device", "headline_metric")
        },
        dict(zip(sm.params.tasks, map(Path, sm.input.curves))),
        predictions,
    )
    Path(sm.output[0]).write_text(page)
