"""Rule learning_curves: one figure per task with every model and seed."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm.plots import plot_curves

    curves = [(model, seed, Path(path)) for (model, seed), path in zip(sm.params.cells, sm.input)]
    plot_curves(sm.wildcards.task, curves, Path(sm.output[0]), sm.params.dpi)
