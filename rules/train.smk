# Per cell: render the TerraTorch config, preflight it, fine-tune.


rule render_config:
    """The cell's resolved TerraTorch config; it changes only when this cell's settings do."""
    input:
        unpack(render_inputs),
    output:
        f"{OUT}/{CELL}/config.yaml",
    log:
        f"{LOGS}/render_config/{CELL_NAME}.log",
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        settings=settings,
        splits_dir=splits_dir,
        run_dir=f"{SCRATCH}/{CELL}",
        weights=lambda w: weights_file(w.model) if needs_download(w.model) else None,
    script:
        "../scripts/render_config.py"


rule preflight:
    """One batch of training, validation, test and prediction, so a broken cell fails in minutes."""
    input:
        config=first_seed_config,
        data=task_data,
    output:
        f"{OUT}/{{task}}/{{model}}/preflight.json",
    log:
        f"{LOGS}/preflight/{{task}}_{{model}}.log",
    benchmark:
        f"{BENCH}/preflight/{{task}}_{{model}}.tsv"
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 20 * attempt,
        gpu=1,
    params:
        task="{task}",
        trainer=EXP["trainer"],
        run_dir=f"{SCRATCH}/{{task}}/{{model}}/preflight",
        err=lambda w: [f"{ERR}/{w.task}_{w.model}_seed{seed}.err" for seed in EXP["seeds"]],
        cell="{task}/{model} (preflight)",
    script:
        "../scripts/preflight.py"


rule finetune:
    """Fine-tune with TerraTorch; the checkpoint is picked on the selection split."""
    input:
        config=f"{OUT}/{CELL}/config.yaml",
        data=task_data,
        preflight=preflight_done,
    output:
        checkpoint=f"{SCRATCH}/{CELL}/best.ckpt",
        curves=f"{OUT}/{CELL}/curves.csv",
        resources=f"{OUT}/{CELL}/finetune.json",
        effective_config=f"{OUT}/{CELL}/config.effective.yaml",
    log:
        f"{LOGS}/finetune/{CELL_NAME}.log",
    benchmark:
        f"{BENCH}/finetune/{CELL_NAME}.tsv"
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
        trainer=EXP["trainer"],
        run_dir=f"{SCRATCH}/{CELL}",
        err=f"{ERR}/{CELL_NAME}.err",
        cell=CELL,
    script:
        "../scripts/finetune.py"
