"""Bad input is rejected before any job starts, with one line naming the key and the fix."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_snakemake, write_config

from geofm import sample_data


@pytest.fixture(scope="module")
def crop_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop_real") / "crop"
    sample_data.write("crop", root, seed=0)
    return root


def _models(**model):
    return {"tiny": {"backbone": "prithvi_eo_tiny", "pretrained": False, **model}}


def _broken_crop(tmp_path, crop_data, how):
    root = tmp_path / "crop"
    shutil.copytree(crop_data, root)
    if how == "no_chips":
        for f in (root / "validation_chips").iterdir():
            f.unlink()
    elif how == "unknown_chip":
        with open(root / "training_data.txt", "a") as f:
            f.write("chip_999_999\n")
    elif how == "missing_mask":
        next((root / "training_chips").glob("*.mask.tif")).unlink()
    return str(root)


CASES = {
    "schema": (lambda tmp, data: {"seeds": "zero"}, "seeds"),
    "unknown_task": (lambda tmp, data: {"tasks": {"flood": {}}}, "tasks: unknown key 'flood'"),
    "unknown_backbone": (lambda tmp, data: {"models": {"v3": {"backbone": "prithvi_eo_v3_300"}}}, "models.v3.backbone"),
    "missing_root": (
        lambda tmp, data: {"tasks": {"crop": {"data_root": str(tmp / "nowhere")}}},
        "tasks.crop.data_root",
    ),
    "no_chips": (
        lambda tmp, data: {"tasks": {"crop": {"data_root": _broken_crop(tmp, data, "no_chips")}}},
        "tasks.crop.data_root",
    ),
    "unknown_chip": (
        lambda tmp, data: {"tasks": {"crop": {"data_root": _broken_crop(tmp, data, "unknown_chip")}}},
        "chip_999_999",
    ),
    "missing_mask": (
        lambda tmp, data: {"tasks": {"crop": {"data_root": _broken_crop(tmp, data, "missing_mask")}}},
        "has no",
    ),
    "missing_weights": (
        lambda tmp, data: {"models": _models(pretrained=True, weights="weights/none.pt")},
        "models.tiny.weights",
    ),
    "weights_without_pretrained": (
        lambda tmp, data: {"models": _models(weights="config/config.yaml")},
        "models.tiny.weights",
    ),
    "unsafe_experiment": (lambda tmp, data: {"experiment": "../other"}, "experiment"),
    "unsafe_model_name": (lambda tmp, data: {"models": {"a/b": {"backbone": "prithvi_eo_tiny"}}}, "models.a/b"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_in_one_line_before_any_job(case, tmp_path, crop_data, shared_cache):
    make, expected = CASES[case]
    # Results of an earlier experiment must survive a bad config untouched.
    earlier = tmp_path / "results" / "sample" / "out" / "summary.csv"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("kept\n")
    changes = make(tmp_path, crop_data)
    changes.setdefault("cache_dir", str(shared_cache))
    config = write_config(tmp_path / "config.yaml", **changes)
    result = run_snakemake(tmp_path, "--cores", "1", configfile=config, timeout=120)
    assert result.returncode != 0
    banner = ("Using workflow specific profile", "Using profile")  # Snakemake's own start-up notes
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith(banner)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: ")
    assert expected in lines[0]
    assert "fix:" in lines[0]
    assert earlier.read_text() == "kept\n"
    # No job ran: nothing but the earlier experiment's file exists in results/, no data, no scratch.
    assert [p for p in (tmp_path / "results").rglob("*") if p.is_file()] == [earlier]
    assert not (tmp_path / "resources" / "sample_data").exists() and not (tmp_path / "scratch").exists()


def test_missing_config_file(tmp_path):
    from geofm.config import ConfigError, load

    with pytest.raises(ConfigError, match="config file not found; fix:"):
        load(tmp_path / "nope.yaml")
