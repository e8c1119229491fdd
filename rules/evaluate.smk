# Per cell: test the selected checkpoint, then plot sample predictions.


rule evaluate:
    """Test the selected checkpoint: every TerraTorch metric, the pinned ones, predictions."""
    input:
        config=L.cell_file("config.yaml"),
        checkpoint=L.checkpoint(),
    output:
        metrics=L.cell_file("metrics.json"),
        resources=L.cell_file("evaluate.json"),
        predictions=L.prediction_arrays(),
    log:
        L.log("evaluate", L.cell_name()),
    benchmark:
        L.benchmark("evaluate", L.cell_name())
    priority: PRIORITY_LONG
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 16000 * attempt,
        runtime=lambda w, attempt: 60 * attempt,
        gpu=1,
    params:
        job=job,
        err=L.err_file(),
        cell=L.cell(),
    script:
        "../scripts/evaluate.py"


rule plot_predictions:
    """Input, ground truth and prediction (and error map for regression) for seeded test chips."""
    input:
        predictions=L.prediction_arrays(),
    output:
        report(
            directory(L.predictions_dir()),
            patterns=["{chip}.png"],
            category="5. Predictions",
            subcategory="{task}",
            labels={"model": "{model}", "seed": "{seed}", "chip": "{chip}"},
            caption="../report/predictions.rst",
        ),
    log:
        L.log("plot_predictions", L.cell_name()),
    conda:
        "../envs/geofm.yaml"
    params:
        task="{task}",
        title="{task} | {model} | seed {seed}",
        plots=EXP["predictions"],
    script:
        "../scripts/plot_predictions.py"
