"""Rule render_config: one cell's resolved TerraTorch config, kept beside its results."""

from pathlib import Path

from geofm import evidence, render

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    settings = sm.params.settings
    paths = {
        "data_root": str(Path(settings["data_root"]).resolve()),
        "run_dir": str(Path(sm.params.run_dir).resolve()),
        "splits_dir": str(Path(settings["splits_dir"]).resolve()),
        "ckpt_path": settings["weights"] or settings["weights_file"],
    }
    if paths["ckpt_path"]:
        paths["ckpt_path"] = str(Path(paths["ckpt_path"]).resolve())
    notes: list[str] = []
    config = render.render(Path(sm.input.recipe).read_text(), settings, paths, notes)
    render.write(config, Path(sm.output[0]), render.header(settings, sm.input.recipe, notes))
