# Experiment-level outputs, in one cheap local step: summary, statistics across seeds, ranking,
# per-class scores, cost ledger, learning curves, provenance manifest and the report's front page
# (geofm/outputs.py). The onerror handler writes the same from whatever finished.


localrules:
    sample_data,
    selection_split,
    validate_data,
    render_search_config,
    hpo_best,
    fetch_weights,
    plot_predictions,
    summarize,


rule summarize:
    """Every experiment-level table, plot and document, from the cells' files."""
    input:
        metrics=cell_files(metrics_file),
        finetune=cell_files(finetune_file),
        configs=cell_files(config_file),
        baselines=[L.baseline(task) for task in EXP["enabled_tasks"]],
        datasets=[L.dataset_manifest(task) for task in EXP["enabled_tasks"]],
        predictions=cell_files(L.predictions_dir),
        lock=f"{workflow.basedir}/uv.lock",  # the manifest records its hash and any drift from it
        searches=[L.hpo_file("best.json", t, m) for t in EXP["enabled_tasks"] for m in MODELS] if HPO["enabled"] else [],
    output:
        summary=report(
            L.table("summary.csv"), category="1. Results", subcategory="Per cell", caption="../report/summary.rst"
        ),
        summary_json=L.table("summary.json"),
        aggregate=report(
            L.table("aggregate.csv"),
            category="1. Results",
            subcategory="Across seeds",
            caption="../report/aggregate.rst",
        ),
        aggregate_json=L.table("aggregate.json"),
        aggregate_md=L.table("aggregate.md"),
        ranking=report(
            L.table("ranking.csv"), category="1. Results", subcategory="Ranking", caption="../report/ranking.rst"
        ),
        ranking_md=L.table("ranking.md"),
        per_class=report(
            L.table("per_class.csv"), category="1. Results", subcategory="Per class", caption="../report/per_class.rst"
        ),
        cost=report(L.table("cost.csv"), category="3. Cost", caption="../report/cost.rst"),
        cost_md=L.table("cost.md"),
        curves=report(
            [L.curves_plot(task) for task in EXP["enabled_tasks"]],
            category="2. Learning curves",
            caption="../report/curves.rst",
        ),
        manifest=report(L.table("manifest.json"), category="4. Provenance", caption="../report/manifest.rst"),
        iqm=report(L.table("iqm.csv"), category="1. Results", subcategory="IQM", caption="../report/iqm.rst"),
        improvement=L.table("improvement.csv"),
        leaderboard=report(
            L.table("leaderboard.csv"),
            category="1. Results",
            subcategory="Leaderboard",
            caption="../report/leaderboard.rst",
        ),
        overview=L.table("overview.html"),
    log:
        L.log("summarize", "summarize"),
    conda:
        "../envs/geofm.yaml"
    params:
        layout=L,
        cells=[list(c) for c in CELLS],
        settings=SUMMARIZE,
    script:
        "../scripts/summarize.py"


onerror:
    # Failed cells cannot feed the summarize rule; write its outputs anyway, marking them.
    from geofm import evidence, outputs

    started = evidence.run_started(log)
    # Jobs the scheduler killed (memory or time limit, scancel) could not write their err/ files.
    workers = HPO["workers"] if HPO["enabled"] else 0
    killed = evidence.write_killed_cells(L, CELLS, since=started, search_workers=workers)
    for cell in killed:
        print(f"{cell}: killed by the scheduler; error file written in {L.err}/", file=sys.stderr)
    for line in evidence.causes(L.err_files(), since=started):  # one line per distinct failure
        print(line, file=sys.stderr)
    outputs.write_all(L, CELLS, SUMMARIZE)
    print(f"Summary with failed cells marked: {L.table('summary.csv')}; error files in {L.err}/", file=sys.stderr)
