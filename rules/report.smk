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
        metrics=cell_files(metrics_file),
        finetune=cell_files(finetune_file),
        baselines=[L.baseline(task) for task in EXP["enabled_tasks"]],
    output:
        csv=report(
            L.table("summary.csv"), category="1. Results", subcategory="Per cell", caption="../report/summary.rst"
        ),
        json=L.table("summary.json"),
    log:
        L.log("summary", "summary"),
    conda:
        "../envs/geofm.yaml"
    params:
        experiment={"experiment": NAME, "description": EXP["description"]},
        cells=[list(c) for c in CELLS],
        layout=L,
    script:
        "../scripts/summary.py"


rule aggregate:
    """Mean, standard deviation and bootstrap interval across seeds; ranking across tasks."""
    input:
        metrics=cell_files(metrics_file),
    output:
        csv=report(
            L.table("aggregate.csv"),
            category="1. Results",
            subcategory="Across seeds",
            caption="../report/aggregate.rst",
        ),
        json=L.table("aggregate.json"),
        md=L.table("aggregate.md"),
        ranking=report(
            L.table("ranking.csv"), category="1. Results", subcategory="Ranking", caption="../report/ranking.rst"
        ),
        ranking_md=L.table("ranking.md"),
        per_class=report(
            L.table("per_class.csv"), category="1. Results", subcategory="Per class", caption="../report/per_class.rst"
        ),
    log:
        L.log("aggregate", "aggregate"),
    conda:
        "../envs/geofm.yaml"
    params:
        cells=[list(c) for c in CELLS],
        bootstrap=EXP["bootstrap"],
        references={m: spec["reference"] for m, spec in EXP["models"].items()},
    script:
        "../scripts/aggregate.py"


rule cost_ledger:
    """Time, device-hours, memory and energy per cell and in total."""
    input:
        L.table("summary.json"),
    output:
        csv=report(L.table("cost.csv"), category="3. Cost", caption="../report/cost.rst"),
        md=L.table("cost.md"),
    log:
        L.log("cost_ledger", "cost_ledger"),
    conda:
        "../envs/geofm.yaml"
    script:
        "../scripts/cost_ledger.py"


rule learning_curves:
    """Training and validation curves of every model and seed of a task."""
    input:
        lambda w: [L.cell_file("curves.csv", *c) for c in CELLS if c.task == w.task],
    output:
        report(
            L.curves_plot(),
            category="2. Learning curves",
            subcategory="{task}",
            labels={"task": "{task}"},
            caption="../report/curves.rst",
        ),
    log:
        L.log("learning_curves", "{task}"),
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
        L.dataset_manifest(),
    log:
        L.log("dataset_manifest", "{task}"),
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
        datasets=[L.dataset_manifest(task) for task in EXP["enabled_tasks"]],
        configs=cell_files(config_file),
        resources=cell_files(finetune_file) + cell_files(evaluate_file),
    output:
        report(L.table("manifest.json"), category="4. Provenance", caption="../report/manifest.rst"),
    log:
        L.log("manifest", "manifest"),
    conda:
        "../envs/geofm.yaml"
    params:
        provenance=provenance(),
    script:
        "../scripts/manifest.py"


rule overview:
    """The report's front page: headline table, ranking, cost and a prediction per task."""
    input:
        aggregate=L.table("aggregate.json"),
        summary=L.table("summary.json"),
        cost=L.table("cost.csv"),
        curves=[L.curves_plot(task) for task in EXP["enabled_tasks"]],
        predictions=[L.predictions_dir(task, MODELS[0], EXP["seeds"][0]) for task in EXP["enabled_tasks"]],
    output:
        L.table("overview.html"),
    log:
        L.log("overview", "overview"),
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
    from geofm import evidence, summary

    # Jobs the scheduler killed (memory or time limit, scancel) could not write their err/ files.
    killed = evidence.write_killed_cells(L, CELLS, since=evidence.run_started(log))
    for cell in killed:
        print(f"{cell}: killed by the scheduler; error file written in {L.err}/", file=sys.stderr)
    summary.write(L, CELLS, EXP)
    print(f"Summary with failed cells marked: {L.table('summary.csv')}; error files in {L.err}/", file=sys.stderr)
