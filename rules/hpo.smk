# Hyperparameter search (hpo.enabled), Optuna's distributed pattern: per task x model, W worker
# jobs run trials against one shared study until it holds N finished trials; hpo_best writes
# the best parameters, which the seed cells' configs are rendered with (geofm/hpo.py).


rule render_search_config:
    """A task x model's config without searched parameters: what every trial starts from."""
    input:
        unpack(search_render_inputs),
    output:
        L.hpo_file("base.yaml"),
    log:
        L.log("render_search_config", "{task}_{model}"),
    priority: PRIORITY_UNBLOCKS
    conda:
        "../envs/geofm.yaml"
    params:
        settings=search_settings,
        run_dir=f"{L.hpo_scratch()}/base",
    script:
        "../scripts/render_search_config.py"


rule hpo_worker:
    """Trials of a task x model's study (each a fine-tune scored on the selection split) until the
    study holds hpo.trials finished trials; a worker killed mid-trial is resumed by a re-run."""
    input:
        config=L.hpo_file("base.yaml"),
    output:
        L.hpo_file("worker{worker}.json"),
    log:
        L.log("hpo_worker", "{task}_{model}_{worker}"),
    benchmark:
        L.benchmark("hpo_worker", "{task}_{model}_{worker}")
    priority: PRIORITY_LONG
    conda:
        "../envs/geofm.yaml"
    threads: 1
    resources:
        # A worker runs about trials / workers fine-tunes one after another.
        mem_mb=lambda w, attempt: 16000 * attempt,
        runtime=lambda w, attempt: 240 * -(-EXP["hpo"]["trials"] // EXP["hpo"]["workers"]) * attempt,
        gpu=1,
    params:
        search=search_params,
        job=job,
    script:
        "../scripts/hpo_worker.py"


rule hpo_best:
    """The best parameters of a task x model's study, its trials, their cost and Optuna's plots."""
    input:
        lambda w: [L.hpo_file(f"worker{i}.json", w.task, w.model) for i in range(EXP["hpo"]["workers"])],
    output:
        best=L.hpo_file("best.json"),
        trials=report(
            L.hpo_file("trials.csv"),
            category="6. Search",
            subcategory="{task}",
            labels={"model": "{model}", "figure": "trials"},
            caption="../report/search.rst",
        ),
        history=report(
            L.hpo_file("optimization_history.png"),
            category="6. Search",
            subcategory="{task}",
            labels={"model": "{model}", "figure": "optimization history"},
            caption="../report/search.rst",
        ),
        importances=report(
            L.hpo_file("param_importances.png"),
            category="6. Search",
            subcategory="{task}",
            labels={"model": "{model}", "figure": "parameter importances"},
            caption="../report/search.rst",
        ),
    log:
        L.log("hpo_best", "{task}_{model}"),
    conda:
        "../envs/geofm.yaml"
    params:
        search=search_params,
    script:
        "../scripts/hpo_best.py"
