"""Data you can trust: every file of a dataset checked against its task's format before any
training, each defect named in one line with the check and the expected and found values."""

from __future__ import annotations

import json
import os
import shutil
import time

import h5py
import numpy as np
import pytest
import rasterio
from conftest import job_counts, run_snakemake, write_config

from geofm import datacheck, sample_data
from geofm.tasks import TASKS


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    for task in TASKS:
        sample_data.write(task, root / task, seed=0)
    return root


def damaged(clean, tmp_path, task):
    root = tmp_path / task
    shutil.copytree(clean / task, root)
    return root


def rewrite_tif(path, data=None, **profile_changes):
    with rasterio.open(path) as f:
        profile, array = f.profile, f.read()
    profile.update(profile_changes)
    array = array if data is None else data(array)
    profile["count"] = array.shape[0]
    profile["dtype"] = str(array.dtype)
    with rasterio.open(path, "w", **profile) as f:
        f.write(array)


def first(root, pattern):
    return sorted(root.glob(pattern))[0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_clean_sample_data_passes_with_no_warning(clean, task):
    document, report = datacheck.validate(task, clean / task)
    assert report.errors == [] and report.warnings == []
    assert report.checked == sum(len(v["entries"]) for v in document["splits"].values()) > 0
    assert document["validation"]["checks"] == datacheck.CHECKS


# (task, file to damage, how, check expected in the one line, severity)
DEFECTS = {
    "truncated_h5": ("landslide", "images/train/image_1.h5", lambda p: p.write_bytes(p.read_bytes()[:5000]),
                     "truncated HDF5 file (5,000 of", "error"),
    "empty_file": ("biomass", "test_labels/*_label.tif", lambda p: p.write_bytes(b""), "empty file (0 bytes)", "error"),
    "not_a_tif": ("crop", "validation_chips/*_merged.tif", lambda p: p.write_bytes(b"<html>404</html>"),
                  "does not open as GeoTIFF", "error"),
    "band_count": ("crop", "training_chips/*_merged.tif", lambda p: rewrite_tif(p, lambda a: a[:17]),
                   "band count (expected 18, found 17)", "error"),
    "dtype": ("biomass", "train_images/*_img.tif", lambda p: rewrite_tif(p, lambda a: a.astype("float64")),
              "dtype (expected float32, found float64)", "error"),
    "shape": ("burn_scars", "validation/*_merged.tif", lambda p: rewrite_tif(p, lambda a: a[:, :500, :500],
              width=500, height=500), "height x width (expected 512x512, found 500x500)", "error"),
    "nodata": ("crop", "training_chips/*_merged.tif", lambda p: rewrite_tif(p, nodata=0),
               "nodata value (expected -9999, found 0.0)", "error"),
    "crs_mixed": ("crop", "validation_chips/*_merged.tif", lambda p: rewrite_tif(p, crs="EPSG:4326"),
                  "CRS (expected EPSG:5070", "error"),
    "label_range_crop": ("crop", "training_chips/*.mask.tif", lambda p: rewrite_tif(p, _class_14),
                         "label values (expected 0-13, found 14", "error"),
    "label_range_landslide": ("landslide", "annotations/test/mask_*.h5", lambda p: _h5(p, "mask", lambda a: a * 2),
                              "label values (expected 0/1, found 2", "error"),
    "label_range_biomass": ("biomass", "val_labels/*_label.tif", lambda p: rewrite_tif(p, lambda a: np.where(a > 1, -5, a).astype(a.dtype)),
                            "label values (expected >= 0 or -1, found -5", "error"),
    "label_range_burn": ("burn_scars", "training/*.mask.tif", lambda p: rewrite_tif(p, lambda a: np.where(a == 1, 2, a).astype(a.dtype)),
                         "label values (expected -1/0/1, found 2", "error"),
    "listed_missing": ("crop", "training_chips/*_merged.tif", lambda p: (p.unlink(), p.with_name(p.name.replace("_merged.tif", ".mask.tif")).unlink()),
                       "whose image is missing", "error"),
    "unlisted": ("crop", "validation_data.txt", lambda p: p.write_text("".join(p.read_text().splitlines(True)[1:])),
                 "lists no chip", "warning"),
    "nan_band": ("biomass", "train_images/*_img.tif", lambda p: rewrite_tif(p, lambda a: _set(a, 3, np.nan)),
                 "band 4 is all NaN", "warning"),
    "nan_pixels": ("landslide", "images/validation/image_*.h5", lambda p: _h5(p, "img", lambda a: _nan_corner(a)),
                   "NaN pixels", "warning"),
    "constant_band": ("burn_scars", "training/*_merged.tif", lambda p: rewrite_tif(p, lambda a: _set(a, 0, 0.25)),
                      "band 1 is one value (0.25) everywhere", "warning"),
}  # fmt: skip


def _class_14(array):
    array = array.copy()
    array[0, 10, 10:20] = 14  # one class past the 13
    return array


def _set(array, band, value):
    array = array.copy()
    array[band] = value
    return array


def _nan_corner(array):
    array = array.copy()
    array[:4, :4, 2] = np.nan
    return array


def _h5(path, key, change):
    with h5py.File(path, "r") as f:
        array = f[key][:]
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=change(array), compression="gzip")


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_named_with_its_file_check_and_values(defect, clean, tmp_path):
    task, pattern, damage, expected, severity = DEFECTS[defect]
    root = damaged(clean, tmp_path, task)
    victim = first(root, pattern)
    damage(victim)
    _, report = datacheck.validate(task, root)
    found = report.errors if severity == "error" else report.warnings
    lines = [line for line in found if expected in line]
    assert lines, f"{defect}: {expected!r} not in {found}"
    line = lines[0]
    assert line.startswith(f"{task}: ") and "; fix: " in line and "\n" not in line
    assert victim.name in line or (defect == "listed_missing" and victim.name.split("_merged")[0] in line)
    if severity == "warning":
        assert not report.errors, report.errors


def test_all_problems_are_listed_capped_with_a_count(clean, tmp_path):
    root = damaged(clean, tmp_path, "landslide")
    masks = sorted(root.glob("annotations/*/mask_*.h5")) + sorted(root.glob("images/*/image_*.h5"))
    for path in masks:
        path.write_bytes(path.read_bytes()[:2000])
    _, report = datacheck.validate("landslide", root)
    assert len(report.errors) == len(masks) > datacheck.SHOWN
    with pytest.raises(datacheck.DataError) as info:
        report.raise_if_errors()
    message = str(info.value)
    first_line, *rest = message.splitlines()
    assert f"(+{len(masks) - 1} more problems, listed below)" in first_line
    assert len(rest) == datacheck.SHOWN + 1 and rest[-1].startswith(f"... and {len(masks) - datacheck.SHOWN} more")


@pytest.fixture(scope="module")
def bad_data_run(tmp_path_factory, clean, shared_cache):
    """A good run, then a broken landslide download and a crop label out of range: both caught
    before any preflight, the biomass cells go on, the earlier results stay."""
    work = tmp_path_factory.mktemp("bad_data")
    data = work / "data"
    for task in ("crop", "landslide"):
        shutil.copytree(clean / task, data / task)
    quick = {"max_epochs": 1, "batch_size": 4}
    tasks = {t: {"enabled": False} for t in TASKS}
    tasks["crop"] = {"data_root": str(data / "crop"), "overrides": quick}
    tasks["landslide"] = {"data_root": str(data / "landslide"), "overrides": quick}
    tasks["biomass"] = {"overrides": quick}
    config = write_config(work / "config.yaml", experiment="bad", tasks=tasks, cache_dir=str(shared_cache),
                          predictions={"samples": 1})  # fmt: skip
    earlier = {  # what an earlier good run of these cells left behind
        work / "results/bad/out/crop/tiny/seed0/metrics.json": '{"pinned": {"mIoU": 0.5}}',
        work / "results/bad/predictions/landslide/tiny/seed0/image_17.png": "an earlier plot",
    }
    for path, text in earlier.items():
        path.parent.mkdir(parents=True)
        path.write_text(text)
    victim = first(data / "landslide", "images/test/image_*.h5")
    victim.write_bytes(victim.read_bytes()[:5000])
    label = first(data / "crop", "training_chips/*.mask.tif")
    good_label = label.read_bytes()
    rewrite_tif(label, _class_14)
    start = time.monotonic()
    result = run_snakemake(work, "--cores", "2", configfile=config, timeout=900)
    return {"work": work, "result": result, "victim": victim, "label": label, "good_label": good_label,
            "config": config, "earlier": earlier, "wall": time.monotonic() - start}  # fmt: skip


@pytest.mark.e2e
def test_bad_files_stop_their_task_before_preflight_named_in_one_line(bad_data_run):
    work, result = bad_data_run["work"], bad_data_run["result"]
    assert result.returncode != 0
    exp = work / "results" / "bad"
    for task, victim, check in (("landslide", bad_data_run["victim"], "truncated HDF5 file"),
                                ("crop", bad_data_run["label"], "label values (expected 0-13, found 14")):  # fmt: skip
        err = (exp / "err" / f"{task}_tiny_seed0.err").read_text()
        cause = next(line for line in err.splitlines() if line.startswith("cause: "))
        assert "stage: validate_data" in err and victim.name in cause and check in cause, cause
        assert f"{task}: " in cause and "fix: " in cause
        # the console says it in one line too
        assert any(victim.name in line and check in line for line in result.stderr.splitlines())
        assert not (exp / "out" / task / "tiny" / "seed0" / "config.yaml").exists(), "no cell of a bad dataset starts"
        assert not (exp / "out" / task / "tiny" / "seed0" / "finetune.json").exists()
    assert (exp / "out" / "biomass" / "tiny" / "seed0" / "metrics.json").is_file(), "other tasks go on"
    print(f"\nbad data reported, biomass finished, in {bad_data_run['wall']:.0f} s")


@pytest.mark.e2e
def test_earlier_results_are_kept(bad_data_run):
    for path, text in bad_data_run["earlier"].items():
        assert path.read_text() == text, f"{path} was lost or overwritten"
    summary = bad_data_run["work"] / "results" / "bad" / "out" / "summary.csv"
    assert "failed" in summary.read_text()  # the run's own summary marks the stopped cells


@pytest.mark.e2e
def test_check_runs_once_per_dataset_version(bad_data_run):
    work, config = bad_data_run["work"], bad_data_run["config"]
    plan = run_snakemake(work, "--dry-run", "results/bad/out/datasets/biomass.json", configfile=config)
    assert plan.returncode == 0 and "validate_data" not in job_counts(plan.stdout)  # unchanged: not re-read
    label = bad_data_run["label"]
    label.write_bytes(bad_data_run["good_label"])  # the fix: a fresh copy
    plan = run_snakemake(work, "--dry-run", "results/bad/out/datasets/crop.json", configfile=config)
    assert job_counts(plan.stdout).get("validate_data") == 1
    done = run_snakemake(work, "--cores", "2", "results/bad/out/datasets/crop.json", configfile=config)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((work / "results" / "bad" / "out" / "datasets" / "crop.json").read_text())
    assert manifest["validation"]["errors"] == [] and manifest["validation"]["checked_files"] > 0
    os.utime(label)  # touched: the fingerprint changes, so it is checked again
    plan = run_snakemake(work, "--dry-run", "results/bad/out/datasets/crop.json", configfile=config)
    assert job_counts(plan.stdout).get("validate_data") == 1


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
@pytest.mark.parametrize("layout", ["tiled-pixel", "tiled-band", "striped-pixel", "striped-band"])
@pytest.mark.parametrize("crs", ["EPSG:32610", "EPSG:4326"])
def test_the_fast_geotiff_path_reads_what_gdal_reads(dtype, layout, crs):
    """Uncompressed GeoTIFFs are checked without GDAL (geofm/geotiff.py): the same pixels and
    georeferencing as rasterio, whatever the tiling, interleave and edge chunks; a cut file is named."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    from geofm import geotiff

    tiled, interleave = layout.split("-")
    profile = dict(driver="GTiff", width=130, height=100, count=5, dtype=dtype, crs=crs, interleave=interleave,
                   transform=from_origin(12.5, 45.0, 0.00027, 0.00027) if crs == "EPSG:4326" else from_origin(5e5, 4e6, 30, 30),
                   nodata=7, **({"tiled": True, "blockxsize": 64, "blockysize": 64} if tiled == "tiled" else {"blockysize": 7}))  # fmt: skip
    array = (np.random.default_rng(1).random((5, 100, 130)) * 100).astype(dtype)
    with MemoryFile() as memory:
        with memory.open(**profile) as f:
            f.write(array)
        data = memory.read()
    got, geo = geotiff.read(data)
    with MemoryFile(data) as memory, memory.open() as f:
        assert np.array_equal(got, f.read())
        assert geo == {"crs": f.crs.to_string(), "res": tuple(round(r, 9) for r in f.res),
                       "transform": tuple(round(v, 6) for v in f.transform[:6]), "nodata": f.nodata}  # fmt: skip
    with pytest.raises(geotiff.Truncated):
        geotiff.read(data[: len(data) // 2])
