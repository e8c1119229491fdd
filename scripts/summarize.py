"""Rule summarize: every experiment-level output from the cells' files (geofm/outputs.py)."""

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm import outputs
    from geofm.config import Cell

    outputs.write_all(sm.params.layout, [Cell(*c) for c in sm.params.cells], sm.params.settings)
