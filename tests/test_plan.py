"""Planning: the jobs a grid expands to, as `snakemake --dry-run` shows them."""

from __future__ import annotations

from conftest import job_counts, run_snakemake, write_config

TWO_MODELS = {
    "tiny": {"backbone": "prithvi_eo_tiny", "pretrained": False},
    "tiny_lr": {"backbone": "prithvi_eo_tiny", "pretrained": False, "overrides": {"lr": 1.0e-4}},
}


def test_grid_2_models_2_seeds_3_tasks(tmp_path, shared_cache):
    config = write_config(tmp_path / "c.yaml", models=TWO_MODELS, seeds=[0, 1], cache_dir=str(shared_cache))
    result = run_snakemake(tmp_path, "--dry-run", configfile=config)
    assert result.returncode == 0, result.stderr
    cells = 2 * 2 * 3
    assert job_counts(result.stdout) == {
        "sample_data": 3,
        "selection_split": 1,
        "validate_data": 3,  # with the trivial baseline
        "finetune": cells,  # each renders its config and starts with the one-batch check of every stage
        "evaluate": cells,
        "plot_predictions": cells,
        "summarize": 1,
        "all": 1,
        "total": 3 + 1 + 3 + 3 * cells + 2,
    }


def test_one_cell_plans_few_jobs(tmp_path, shared_cache):
    tasks = {"crop": {"enabled": False}, "landslide": {"enabled": False}, "biomass": {}}
    config = write_config(tmp_path / "c.yaml", tasks=tasks, cache_dir=str(shared_cache))
    result = run_snakemake(tmp_path, "--dry-run", configfile=config)
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout)["total"] == 7  # was 16 before preflight, baseline, render and the tables merged


def test_disabled_task_and_no_preflight(tmp_path, shared_cache):
    config = write_config(
        tmp_path / "c.yaml",
        preflight=False,
        tasks={"crop": {"enabled": False}, "landslide": {}, "biomass": {}},
        cache_dir=str(shared_cache),
    )
    result = run_snakemake(tmp_path, "--dry-run", configfile=config)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert "selection_split" not in counts
    assert counts["finetune"] == 2 and counts["sample_data"] == 2
