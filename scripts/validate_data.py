"""Rule validate_data: every file of a dataset checked against its task's format and hashed
(the dataset manifest), a bad file failing the task's cells before any training, named in one
line; then the trivial baseline on the reported split."""

import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="validate_data", cell=sm.params.cell):
    from geofm import datacheck, metrics

    root = Path(sm.params.data_root)
    document, report = datacheck.validate(sm.wildcards.task, root, threads=sm.threads)
    print(json.dumps(document["validation"], indent=1))
    report.raise_if_errors()
    Path(sm.output.manifest).write_text(json.dumps(document, indent=1))
    splits = Path(sm.input.splits).parent if sm.input.splits else None
    Path(sm.output.baseline).write_text(json.dumps(metrics.baseline(sm.wildcards.task, root, splits), indent=2))
