"""Rule render_search_config: the config every trial of a task x model's search starts from."""

from pathlib import Path

from geofm import evidence, render

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    render.write_cell_config(sm.params.settings, Path(sm.input.recipe), Path(sm.params.run_dir), Path(sm.output[0]))
