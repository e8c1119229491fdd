"""Rule summary: out/summary.csv and out/summary.json."""

from pathlib import Path

from geofm import errors, summary
from geofm.config import Cell

sm = snakemake  # noqa: F821 (provided by Snakemake)
with errors.captured(sm.log[0]):
    experiment = sm.params.experiment
    out_dir = Path(sm.output.csv).parent
    cells = [Cell(*c) for c in sm.params.cells]
    summary.write(out_dir, Path(sm.params.err_dir), cells, experiment, Path(sm.output.csv), Path(sm.output.json))
