"""Rule finetune: fit one cell with TerraTorch and keep the selected checkpoint."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="finetune", cell=sm.params.cell):
    from geofm import training

    outputs = {name: sm.output[name] for name in ("checkpoint", "curves", "resources", "effective_config")}
    training.finetune(Path(sm.input.config), Path(sm.params.run_dir), sm.params.job, sm.threads, outputs)
