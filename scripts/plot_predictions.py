"""Rule plot_predictions: PNGs of seeded test chips from a cell's saved predictions."""

from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm.plots import plot_predictions

    p = sm.params.plots
    written = plot_predictions(
        sm.params.task,
        Path(sm.input.predictions),
        Path(sm.output[0]),
        p["samples"],
        p["seed"],
        p["dpi"],
        sm.params.title,
    )
    print("\n".join(str(w) for w in written))
