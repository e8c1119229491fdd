"""A 2 models x 3 tasks x 2 seeds grid on the sample data: statistics, comparison, the HTML
report in a real browser, and exactly which jobs re-run after each kind of change."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, job_counts, run_snakemake, write_config
from PIL import Image

from geofm import stats
from geofm.tasks import TASKS

pytestmark = pytest.mark.e2e
MODELS = {
    "tiny": {"backbone": "prithvi_eo_tiny", "pretrained": False},
    "tiny_wd": {
        "backbone": "prithvi_eo_tiny",
        "pretrained": False,
        "overrides": {"weight_decay": 0.3},
        "reference": {"crop": {"metric": "mIoU", "value": 0.9, "tolerance": 0.05, "source": "made up for the test"}},
    },
}
QUICK = {"overrides": {"max_epochs": 1, "batch_size": 4}}
BOOTSTRAP = {"resamples": 2000, "seed": 3, "confidence": 0.95}


def grid_config(path: Path, cache: Path, **changes) -> Path:
    settings = dict(
        experiment="grid",
        models=MODELS,
        seeds=[0, 1],
        preflight=False,
        predictions={"samples": 1},
        bootstrap=BOOTSTRAP,
        cache_dir=str(cache),
        tasks={"crop": QUICK, "landslide": QUICK, "biomass": QUICK},
    )
    settings.update(changes)
    return write_config(path, **settings)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, shared_cache):
    workdir = tmp_path_factory.mktemp("grid")
    config = grid_config(workdir / "config.yaml", shared_cache)
    result = run_snakemake(workdir, "--cores", "2", configfile=config, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config


def per_cell(workdir: Path) -> dict[tuple[str, str, str], list[float]]:
    values: dict = {}
    for path in sorted((workdir / "results" / "grid" / "out").glob("*/*/seed*/metrics.json")):
        task, model = path.parts[-4], path.parts[-3]
        for metric, value in json.loads(path.read_text())["pinned"].items():
            if metric != "labelled_pixels" and value is not None:
                values.setdefault((task, model, metric), []).append(value)
    return values


def test_aggregate_matches_independent_computation(grid):
    workdir, _ = grid
    document = json.loads((workdir / "results" / "grid" / "out" / "aggregate.json").read_text())
    rows = {(r["task"], r["model"], r["metric"]): r for r in document["rows"]}
    independent = per_cell(workdir)
    assert set(rows) == set(independent) and len(independent) > 12 * 3
    for key, values in independent.items():
        row = rows[key]
        assert row["seeds"] == len(values)  # a class absent from one seed's split has no score there
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-6)
        if len(values) > 1:
            assert row["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
            assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        else:
            assert row["std"] is None and row["ci_low"] is None and row["ci_note"] == stats.ONE_SEED
    ran = {t for t, _, _ in independent}  # the default config's tasks (burn scars is opt-in)
    assert ran == {t for t in TASKS if TASKS[t].default_enabled}
    assert all(rows[(t, m, TASKS[t].headline)]["seeds"] == 2 for t in ran for m in MODELS)
    assert document["definitions"]["landslide"]["landslide_F1"].startswith("F1 of the landslide class")


def test_bootstrap_interval_is_reproducible(grid):
    workdir, _ = grid
    rows = json.loads((workdir / "results" / "grid" / "out" / "aggregate.json").read_text())["rows"]
    row = next(r for r in rows if r["task"] == "crop" and r["model"] == "tiny" and r["metric"] == "mIoU")
    values = per_cell(workdir)[("crop", "tiny", "mIoU")]
    ci = stats.bootstrap_ci(values, BOOTSTRAP["resamples"], BOOTSTRAP["seed"], BOOTSTRAP["confidence"])
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci[0], abs=1e-6), pytest.approx(ci[1], abs=1e-6))


def test_reference_flagged_and_ranking_states_its_rule(grid):
    workdir, _ = grid
    out = workdir / "results" / "grid" / "out"
    rows = json.loads((out / "aggregate.json").read_text())["rows"]
    ref = next(r for r in rows if r["model"] == "tiny_wd" and r["task"] == "crop" and r["metric"] == "mIoU")
    assert ref["reference"] == 0.9 and ref["within_tolerance"] is False
    assert ref["delta_to_reference"] == pytest.approx(ref["mean"] - 0.9, abs=1e-6)
    ranking = (out / "ranking.md").read_text()
    assert stats.RANKING_RULE in ranking and "tiny_wd" in ranking
    assert "| task | model | metric | seeds |" in (out / "aggregate.md").read_text()
    cost = (out / "cost.csv").read_text().splitlines()
    assert len(cost) == 1 + 12 + 1 and cost[-1].startswith("TOTAL")


def test_manifest_provenance(grid):
    workdir, _ = grid
    manifest = json.loads((workdir / "results" / "grid" / "out" / "manifest.json").read_text())
    assert len(manifest["code"]["commit"]) == 40
    assert manifest["seeds"] == [0, 1] and len(manifest["config_sha256"]) == 64
    assert set(manifest["datasets"]) == {"crop", "landslide", "biomass"}
    assert manifest["datasets"]["landslide"]["test"]["files"] == 8  # 4 images + 4 masks
    assert len(manifest["rendered_configs"]) == 12
    assert manifest["packages"]["terratorch"] == "1.2.11"
    assert manifest["hardware"] and manifest["hardware"][0]["cpu"]


def test_compare_with_itself_shows_zero_and_nothing_significant(grid, tmp_path):
    workdir, _ = grid
    results = workdir / "results" / "grid"
    out = subprocess.run(
        [
            str(VENV_BIN / "geofm-compare"),
            str(results),
            str(results),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "0 of" in out.stdout and "differences are significant" in out.stdout
    rows = (tmp_path / "comparison.csv").read_text().splitlines()[1:]
    assert len(rows) > 12
    for line in rows:
        fields = line.split(",")
        assert float(fields[7]) == 0.0  # difference
    assert "| task | model | metric |" in (tmp_path / "comparison.md").read_text()


def test_report_opens_in_chromium_with_table_and_prediction(grid, tmp_path):
    workdir, config = grid
    report = workdir / "report.html"
    result = run_snakemake(workdir, "--report", str(report), configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
    ]  # fmt: skip
    shot = workdir / "report.png"
    subprocess.run(
        ["chromium", *flags, "--window-size=1400,2200", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # The front page shows the aggregated table and the prediction plots, rendered by the browser.
    assert "Headline metrics across seeds" in dom and "tiny_wd" in dom and "95% bootstrap interval" in dom
    assert dom.count("data:image/png;base64,") >= 3
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 500, "blank screenshot"
        white = sum(c for c, px in (colours or []) if px == (255, 255, 255))
        assert white < 0.9 * rgb.width * rgb.height


def test_changing_plot_settings_reruns_only_plotting(grid, shared_cache):
    workdir, _ = grid
    config = grid_config(workdir / "plots.yaml", shared_cache, predictions={"samples": 2, "dpi": 60})
    plan = run_snakemake(workdir, "--dry-run", configfile=config)
    assert plan.returncode == 0, plan.stderr
    # Plots only, and the one cheap step that writes the tables, learning curves (at the new dpi),
    # the page showing them and the provenance manifest (whose config hash records every change).
    assert job_counts(plan.stdout) == {"plot_predictions": 12, "summarize": 1, "all": 1, "total": 14}


def test_changing_one_model_reruns_only_its_cells_and_the_aggregations(grid, shared_cache):
    workdir, _ = grid
    models = yaml.safe_load(yaml.safe_dump(MODELS))
    models["tiny_wd"]["overrides"]["lr"] = 2.0e-4
    config = grid_config(workdir / "model.yaml", shared_cache, models=models)
    plan = run_snakemake(workdir, "--dry-run", configfile=config)
    assert plan.returncode == 0, plan.stderr
    cells = 3 * 2  # tiny_wd's cells only
    assert job_counts(plan.stdout) == {
        "finetune": cells,
        "evaluate": cells,
        "plot_predictions": cells,
        "summarize": 1,
        "all": 1,
        "total": 3 * cells + 2,
    }
    assert "model=tiny," not in plan.stdout.replace("model=tiny_wd", "")
