"""Rule validate_data: every file of a dataset checked against its task's format and hashed
(the dataset manifest); a bad file fails the task's cells before preflight, named in one line."""

import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="validate_data", cell=sm.params.cell):
    from geofm import datacheck

    document, report = datacheck.validate(sm.wildcards.task, Path(sm.params.data_root), threads=sm.threads)
    print(json.dumps(document["validation"], indent=1))
    report.raise_if_errors()
    Path(sm.output[0]).write_text(json.dumps(document, indent=1))
