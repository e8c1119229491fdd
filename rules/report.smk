# Experiment-level outputs: summary, statistics across seeds, cost, provenance, report pieces.


localrules:
    sample_data,
    selection_split,
    fetch_weights,
    baseline,
    render_config,
    plot_predictions,
    summary,
    aggregate,
    cost_ledger,
    learning_curves,
    dataset_manifest,
    manifest,
    overview,


rule summary:
    """One row per cell: status, headline metric against the trivial baseline, resources."""
    input:
        metrics=cell_files(f"{OUT}/{CELL}/metrics.json"),
        finetune=cell_files(f"{OUT}/{CELL}/finetune.json"),
        baselines=expand(f"{OUT}/baselines/{{task}}.json", task=EXP["enabled_tasks"]),
    output:
        csv=report(f"{OUT}/summary.csv", category="1. Results", subcategory="Per cell", caption="../report/summary.rst"),
        json=f"{OUT}/summary.json",
    log:
        f"{LOGS}/summary.log",
    conda:
        "../envs/geofm.yaml"
    params:
        experiment={"experiment": NAME, "description": EXP["description"]},
        cells=[[c.task, c.model, c.seed] for c in CELLS],
        err_dir=ERR,
    script:
        "../scripts/summary.py"


rule aggregate:
    """Mean, standard deviation and bootstrap interval across seeds; ranking across tasks."""
    input:
        metrics=cell_files(f"{OUT}/{CELL}/metrics.json"),
    output:
        csv=report(
            f"{OUT}/aggregate.csv",
            category="1. Results",
            subcategory="Across seeds",
            caption="../report/aggregate.rst",
        ),
        json=f"{OUT}/aggregate.json",
        md=f"{OUT}/aggregate.md",
        ranking=report(
            f"{OUT}/ranking.csv", category="1. Results", subcategory="Ranking", caption="../report/ranking.rst"
        ),
        ranking_md=f"{OUT}/ranking.md",
        per_class=report(
            f"{OUT}/per_class.csv", category="1. Results", subcategory="Per class", caption="../report/per_class.rst"
        ),
    log:
        f"{LOGS}/aggregate.log",
    conda:
        "../envs/geofm.yaml"
    params:
        cells=[[c.task, c.model, c.seed] for c in CELLS],
        bootstrap=EXP["bootstrap"],
        references={m: spec["reference"] for m, spec in EXP["models"].items()},
    script:
        "../scripts/aggregate.py"


rule cost_ledger:
    """Time, device-hours, memory and energy per cell and in total."""
    input:
        f"{OUT}/summary.json",
    output:
        csv=report(f"{OUT}/cost.csv", category="3. Cost", caption="../report/cost.rst"),
        md=f"{OUT}/cost.md",
    log:
        f"{LOGS}/cost_ledger.log",
    conda:
        "../envs/geofm.yaml"
    script:
        "../scripts/cost_ledger.py"


rule learning_curves:
    """Training and validation curves of every model and seed of a task."""
    input:
        lambda w: [f"{OUT}/{c.task}/{c.model}/seed{c.seed}/curves.csv" for c in CELLS if c.task == w.task],
    output:
        report(
            f"{OUT}/curves/{{task}}.png",
            category="2. Learning curves",
            subcategory="{task}",
            labels={"task": "{task}"},
            caption="../report/curves.rst",
        ),
    log:
        f"{LOGS}/learning_curves/{{task}}.log",
    conda:
        "../envs/geofm.yaml"
    params:
        cells=lambda w: [[c.model, c.seed] for c in CELLS if c.task == w.task],
        dpi=EXP["predictions"]["dpi"],
    script:
        "../scripts/learning_curves.py"


rule dataset_manifest:
    """Every file of a dataset with its size and content hash, per split."""
    input:
        task_data,
    output:
        f"{OUT}/datasets/{{task}}.json",
    log:
        f"{LOGS}/dataset_manifest/{{task}}.log",
    conda:
        "../envs/geofm.yaml"
    params:
        data_root=lambda w: EXP["tasks"][w.task]["data_root"],
        fingerprint=dataset_fingerprint,
    script:
        "../scripts/dataset_manifest.py"


rule manifest:
    """Provenance of the experiment: code, config, data, weights, packages, hardware, jobs."""
    input:
        datasets=expand(f"{OUT}/datasets/{{task}}.json", task=EXP["enabled_tasks"]),
        configs=cell_files(f"{OUT}/{CELL}/config.yaml"),
        resources=cell_files(f"{OUT}/{CELL}/finetune.json") + cell_files(f"{OUT}/{CELL}/evaluate.json"),
    output:
        report(f"{OUT}/manifest.json", category="4. Provenance", caption="../report/manifest.rst"),
    log:
        f"{LOGS}/manifest.log",
    conda:
        "../envs/geofm.yaml"
    params:
        provenance=provenance(),
    script:
        "../scripts/manifest.py"


rule overview:
    """The report's front page: headline table, ranking, cost and a prediction per task."""
    input:
        aggregate=f"{OUT}/aggregate.json",
        summary=f"{OUT}/summary.json",
        cost=f"{OUT}/cost.csv",
        curves=expand(f"{OUT}/curves/{{task}}.png", task=EXP["enabled_tasks"]),
        predictions=[f"{PRED}/{task}/{MODELS[0]}/seed{EXP['seeds'][0]}" for task in EXP["enabled_tasks"]],
    output:
        f"{OUT}/overview.html",
    log:
        f"{LOGS}/overview.log",
    conda:
        "../envs/geofm.yaml"
    params:
        experiment=NAME,
        description=EXP["description"],
        tasks=EXP["enabled_tasks"],
    script:
        "../scripts/overview.py"


onerror:
    # Failed cells cannot feed the summary rule; write the summary anyway, marking them.
    from pathlib import Path
    from geofm import errors, summary

    # Jobs the scheduler killed (memory or time limit, scancel) could not write their err/ files.
    killed = errors.write_killed_cells(
        CELLS, out_dir=OUT, err_dir=ERR, logs_dir=LOGS, since=errors.run_started(log)
    )
    for cell in killed:
        print(f"{cell}: killed by the scheduler; error file written in {ERR}/", file=sys.stderr)
    summary.write(Path(OUT), Path(ERR), CELLS, EXP, Path(f"{OUT}/summary.csv"), Path(f"{OUT}/summary.json"))
    print(f"Summary with failed cells marked: {OUT}/summary.csv; error files in {ERR}/", file=sys.stderr)
