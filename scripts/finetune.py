"""Rule finetune: render the cell's TerraTorch config, fit it and keep the selected checkpoint."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0], sm.params.err, stage="finetune", cell=sm.params.cell):
    from geofm import render, training

    config, best = Path(sm.output.config), sm.input.get("best")
    render.write_cell_config(sm.params.settings, Path(sm.input.recipe), Path(sm.params.run_dir), config, best)
    outputs = {name: sm.output[name] for name in ("checkpoint", "curves", "resources", "effective_config")}
    training.finetune(config, Path(sm.params.run_dir), sm.params.job, sm.threads, outputs)
