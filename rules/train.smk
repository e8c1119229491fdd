# Per cell, one job: render the TerraTorch config, check its splits and one batch of every stage,
# fine-tune. Rendering in the job (not in a local job of its own) makes every fine-tune of a
# task ready together, when the task's data check ends: the SLURM profile submits them as one
# array (a local render job per cell released them one at a time).


rule finetune:
    """Render the cell's resolved TerraTorch config (it changes only when this cell's settings
    do), then fine-tune with TerraTorch after checking the splits (a leak is refused) and one
    batch of every stage (preflight: a broken cell fails in minutes); the checkpoint is picked on
    the selection split."""
    input:
        unpack(render_inputs),
    output:
        config=L.cell_file("config.yaml"),
        checkpoint=L.checkpoint(),
        curves=L.cell_file("curves.csv"),
        resources=L.cell_file("finetune.json"),
        effective_config=L.cell_file("config.effective.yaml"),
    log:
        L.log("finetune", L.cell_name()),
    benchmark:
        L.benchmark("finetune", L.cell_name())
    priority: PRIORITY_LONG
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        # Grows on retry after an out-of-memory or time-limit kill.
        mem_mb=lambda w, attempt: 16000 * attempt,
        runtime=lambda w, attempt: 240 * attempt,
        gpu=1,
    params:
        settings=settings,
        job=job,
        run_dir=L.cell_scratch(),
        err=L.err_file(),
        cell=L.cell(),
    script:
        "../scripts/finetune.py"
