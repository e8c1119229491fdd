"""Rule render_config: one cell's resolved TerraTorch config, kept beside its results."""

from pathlib import Path

from geofm import evidence, render

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    settings = sm.params.settings
    paths = {
        "data_root": str(Path(settings["data_root"]).resolve()),
        "run_dir": str(Path(sm.params.run_dir).resolve()),
        "splits_dir": str(Path(sm.params.splits_dir).resolve()),
        "ckpt_path": settings["weights"] or sm.params.weights,
    }
    if paths["ckpt_path"]:
        paths["ckpt_path"] = str(Path(paths["ckpt_path"]).resolve())
    config = render.render(Path(sm.input.recipe).read_text(), settings, paths)
    header = (
        f"Cell {settings['task']} / {settings['model']} / seed {settings['seed']}, rendered from {sm.input.recipe}.\n"
        "Run it by hand with: terratorch fit --config <this file>\n"
        "trainer.precision 'auto' and num_workers 'auto' are decided by the job for its hardware;\n"
        "config.effective.yaml beside this file is what actually ran."
    )
    render.write(config, Path(sm.output[0]), header)
