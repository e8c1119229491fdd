"""Rule preflight: the splits checked, then one batch of each stage for a task x model, before
the long fine-tunes."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="preflight", cell=sm.params.cell):
    from geofm import training

    training.preflight(Path(sm.input.config), Path(sm.params.run_dir), sm.params.job, sm.threads, Path(sm.output[0]))
