# Per cell: render the TerraTorch config, fine-tune (after its splits and one batch of every stage
# are checked).


rule render_config:
    """The cell's resolved TerraTorch config; it changes only when this cell's settings do."""
    input:
        unpack(render_inputs),
    output:
        L.cell_file("config.yaml"),
    log:
        L.log("render_config", L.cell_name()),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        settings=settings,
        run_dir=L.cell_scratch(),
    script:
        "../scripts/render_config.py"


rule finetune:
    """Fine-tune with TerraTorch after checking the splits (a leak is refused) and one batch of
    every stage (preflight: a broken cell fails in minutes); the checkpoint is picked on the
    selection split."""
    input:
        config=L.cell_file("config.yaml"),
    output:
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
        job=job,
        run_dir=L.cell_scratch(),
        err=L.err_file(),
        cell=L.cell(),
    script:
        "../scripts/finetune.py"
