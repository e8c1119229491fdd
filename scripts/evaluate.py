"""Rule evaluate: test the selected checkpoint and save metrics and predictions."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="evaluate", cell=sm.params.cell):
    from geofm import training

    outputs = {name: sm.output[name] for name in ("metrics", "resources", "predictions")}
    training.evaluate(Path(sm.input.config), Path(sm.input.checkpoint), sm.params.job, sm.threads, outputs)
