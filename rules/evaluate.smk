# Per cell: test the selected checkpoint, then plot sample predictions.


rule evaluate:
    """Test the selected checkpoint: every TerraTorch metric, the pinned ones, predictions."""
    input:
        config=f"{OUT}/{CELL}/config.yaml",
        checkpoint=f"{SCRATCH}/{CELL}/best.ckpt",
        data=task_data,
    output:
        metrics=f"{OUT}/{CELL}/metrics.json",
        resources=f"{OUT}/{CELL}/evaluate.json",
        predictions=f"{SCRATCH}/{CELL}/predictions.npz",
    log:
        f"{LOGS}/evaluate/{CELL_NAME}.log",
    benchmark:
        f"{BENCH}/evaluate/{CELL_NAME}.tsv"
    priority: PRIORITY_LONG
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 16000 * attempt,
        runtime=lambda w, attempt: 60 * attempt,
        gpu=1,
    params:
        task="{task}",
        trainer=EXP["trainer"],
        err=f"{ERR}/{CELL_NAME}.err",
        cell=CELL,
    script:
        "../scripts/evaluate.py"


rule plot_predictions:
    """Input, ground truth and prediction (and error map for biomass) for seeded test chips."""
    input:
        predictions=f"{SCRATCH}/{CELL}/predictions.npz",
        data=task_data,
    output:
        report(
            directory(f"{PRED}/{CELL}"),
            patterns=["{chip}.png"],
            category="5. Predictions",
            subcategory="{task}",
            labels={"model": "{model}", "seed": "{seed}", "chip": "{chip}"},
            caption="../report/predictions.rst",
        ),
    log:
        f"{LOGS}/plot_predictions/{CELL_NAME}.log",
    conda:
        "../envs/geofm.yaml"
    params:
        task="{task}",
        title=lambda w: f"{w.task} | {w.model} | seed {w.seed}",
        plots=EXP["predictions"],
    script:
        "../scripts/plot_predictions.py"
