"""Rule summary: out/summary.csv and out/summary.json."""

from geofm import evidence, summary
from geofm.config import Cell

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    summary.write(sm.params.layout, [Cell(*c) for c in sm.params.cells], sm.params.experiment)
