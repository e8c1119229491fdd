"""Rule cost_ledger: out/cost.csv and out/cost.md from the summary."""

import csv
import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm.formatting import markdown
    from geofm.ledger import COLUMNS, ledger

    rows = ledger(json.loads(Path(sm.input[0]).read_text())["rows"])
    with open(sm.output.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    Path(sm.output.md).write_text(markdown(rows, COLUMNS))
