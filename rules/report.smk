# Experiment-level outputs: the summary table (more in later rules).


localrules:
    sample_data,
    selection_split,
    fetch_weights,
    baseline,
    render_config,
    plot_predictions,
    summary,


rule summary:
    """One row per cell: status, headline metric against the trivial baseline, resources."""
    input:
        metrics=cell_files(f"{OUT}/{CELL}/metrics.json"),
        finetune=cell_files(f"{OUT}/{CELL}/finetune.json"),
        baselines=expand(f"{OUT}/baselines/{{task}}.json", task=EXP["enabled_tasks"]),
    output:
        csv=f"{OUT}/summary.csv",
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


onerror:
    # Failed cells cannot feed the summary rule; write the summary anyway, marking them.
    from pathlib import Path
    from geofm import summary

    summary.write(Path(OUT), Path(ERR), CELLS, EXP, Path(f"{OUT}/summary.csv"), Path(f"{OUT}/summary.json"))
    print(f"Summary with failed cells marked: {OUT}/summary.csv; error files in {ERR}/", file=sys.stderr)
