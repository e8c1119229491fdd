# Per cell: render the TerraTorch config, preflight it, fine-tune.


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
        splits_dir=lambda w: L.splits_dir(w.task),
        run_dir=L.cell_scratch(),
        weights=lambda w: weights_file(w.model) if needs_download(w.model) else None,
    script:
        "../scripts/render_config.py"


rule preflight:
    """One batch of training, validation, test and prediction, so a broken cell fails in minutes."""
    input:
        config=first_seed_config,
        data=task_data,
    output:
        L.preflight(),
    log:
        L.log("preflight", "{task}_{model}"),
    benchmark:
        L.benchmark("preflight", "{task}_{model}")
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 20 * attempt,
        gpu=1,
    params:
        job=job,
        run_dir=f"{L.scratch}/{{task}}/{{model}}/preflight",
        err=lambda w: [L.err_file(w.task, w.model, seed) for seed in EXP["seeds"]],
        cell="{task}/{model} (preflight)",
    script:
        "../scripts/preflight.py"


rule finetune:
    """Fine-tune with TerraTorch; the checkpoint is picked on the selection split."""
    input:
        config=L.cell_file("config.yaml"),
        data=task_data,
        preflight=preflight_done,
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
