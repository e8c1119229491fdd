"""Rule evaluate: test the selected checkpoint and save metrics and predictions."""

from pathlib import Path

from geofm import errors

sm = snakemake  # noqa: F821 (provided by Snakemake)
with errors.captured(sm.log[0], sm.params.err, stage="evaluate", cell=sm.params.cell):
    from geofm import jobs

    outputs = {name: sm.output[name] for name in ("metrics", "resources", "predictions")}
    jobs.evaluate(
        Path(sm.input.config), Path(sm.input.checkpoint), sm.params.task, sm.params.trainer, sm.threads, outputs
    )
