"""A cell that fails after its data passed validation (a file changed under the run): its err/
file names the file, the other cells go on, the run exits non-zero, a fix re-runs only that cell."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil

import pytest
from conftest import run_snakemake, write_config

from geofm import sample_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, shared_cache):
    workdir = tmp_path_factory.mktemp("failed_run")
    # Landslide data at a "real" path: it passes the layout check and validate_data...
    data = workdir / "landslide_data"
    sample_data.write("landslide", data, seed=0)
    victim = sorted((data / "images" / "test").glob("image_*.h5"))[-1]
    good = victim.read_bytes()
    quick = {"max_epochs": 1, "batch_size": 4}
    config = write_config(
        workdir / "config.yaml",
        experiment="broken",
        preflight=False,
        predictions={"samples": 1},
        cache_dir=str(shared_cache),
        tasks={
            "crop": {"overrides": quick},
            "landslide": {"overrides": quick, "data_root": str(data)},
            "biomass": {"overrides": quick},
        },
    )
    checked = run_snakemake(workdir, "--cores", "1", "results/broken/out/datasets/landslide.json", configfile=config)
    assert checked.returncode == 0, checked.stderr[-3000:]
    # ...then one test chip is damaged under the run, same size and time (a failing disk, a
    # half-finished copy), so nothing tells the workflow it changed.
    stat = victim.stat()
    victim.write_bytes(b"\0" * 1024 + good[1024:])
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_snakemake(workdir, "--cores", "2", configfile=config, timeout=900)
    return workdir, result, victim, good, config


def test_run_exits_non_zero(failed_run):
    _, result, *_ = failed_run
    assert result.returncode != 0


def test_err_file_names_cause_log_and_tail(failed_run):
    workdir, _, victim, *_ = failed_run
    err = workdir / "results" / "broken" / "err" / "landslide_tiny_seed0.err"
    text = err.read_text()
    assert "stage: evaluate" in text
    assert "cell: landslide/tiny/seed0" in text
    cause = next(line for line in text.splitlines() if line.startswith("cause: "))
    assert cause.startswith("cause: DataFileError: ") and str(victim) in cause, cause  # the file is named
    assert "OSError" in cause and "fix: re-download it" in cause
    log = next(line for line in text.splitlines() if line.startswith("log: "))[5:]
    assert (workdir / log).is_file() or (workdir.joinpath(log)).exists()
    assert "--- traceback ---" in text and "--- last 40 lines of" in text


def test_other_cells_finished(failed_run):
    workdir, *_ = failed_run
    out = workdir / "results" / "broken" / "out"
    for task in ("crop", "biomass"):
        assert (out / task / "tiny" / "seed0" / "metrics.json").is_file()
        assert any((workdir / "results" / "broken" / "predictions" / task / "tiny" / "seed0").glob("*.png"))
    assert not (out / "landslide" / "tiny" / "seed0" / "metrics.json").exists()
    # The fine-tune before the failing step is kept: a re-run redoes only what failed.
    assert (out / "landslide" / "tiny" / "seed0" / "finetune.json").is_file()


def test_summary_marks_failed_cell(failed_run):
    workdir, *_ = failed_run
    rows = {r["task"]: r for r in csv.DictReader(open(workdir / "results" / "broken" / "out" / "summary.csv"))}
    assert rows["landslide"]["status"] == "failed"
    assert rows["landslide"]["err_file"].endswith("landslide_tiny_seed0.err")
    assert "OSError" in rows["landslide"]["error"] or rows["landslide"]["error"]
    assert rows["crop"]["status"] == "ok" and rows["biomass"]["status"] == "ok"


def test_fixing_the_data_reruns_only_that_cell(failed_run):
    from conftest import job_counts

    workdir, _, victim, good, config = failed_run
    datasets = workdir / "results" / "broken" / "out" / "datasets"
    before = {t: json.loads((datasets / f"{t}.json").read_text())["sha256"] for t in ("crop", "landslide", "biomass")}
    victim.write_bytes(good)
    plan = run_snakemake(workdir, "--dry-run", configfile=config)
    assert plan.returncode == 0, plan.stderr
    assert job_counts(plan.stdout) == {
        "evaluate": 1,
        "plot_predictions": 1,
        "validate_data": 1,  # the landslide data changed: checked and re-hashed
        "summarize": 1,
        "all": 1,
        "total": 5,
    }
    result = run_snakemake(workdir, "--cores", "2", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    err_dir = workdir / "results" / "broken" / "err"
    assert not any(err_dir.glob("*.err")), "a fixed cell's error file is removed"
    rows = {
        r["task"]: r["status"] for r in csv.DictReader(open(workdir / "results" / "broken" / "out" / "summary.csv"))
    }
    assert set(rows.values()) == {"ok"}
    # The provenance follows the data: the restored file has its original content again (the
    # damage kept the size and time, so the manifest never saw it), checked and re-hashed.
    after = {t: json.loads((datasets / f"{t}.json").read_text())["sha256"] for t in before}
    assert after == before
    entry = next(
        e for split in json.loads((datasets / "landslide.json").read_text())["splits"].values()
        for e in split["entries"] if e["path"].endswith(victim.name) and "images/test" in e["path"]
    )  # fmt: skip
    assert entry["sha256"] == hashlib.sha256(good).hexdigest()
    manifest = json.loads((workdir / "results" / "broken" / "out" / "manifest.json").read_text())
    assert manifest["datasets"]["landslide"]["sha256"] == after["landslide"]
    shutil.rmtree(workdir / "scratch", ignore_errors=True)
