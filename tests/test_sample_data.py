"""The sample data is in each real dataset's on-disk format: TerraTorch's own readers load it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio

from geofm import sample_data
from geofm.tasks import TASKS
from geofm.tasks.base import read_ids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    for task in TASKS:
        sample_data.write(task, root / task, seed=0)
    return root


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_small_and_seeded(data, tmp_path):
    assert sum(_size(data / t) for t, spec in TASKS.items() if spec.default_enabled) < 50 * 2**20
    assert all(_size(data / t) < 20 * 2**20 for t in TASKS)
    sample_data.write("landslide", tmp_path / "again", seed=0)
    a = h5py.File(data / "landslide" / "images" / "train" / "image_1.h5")["img"][:]
    b = h5py.File(tmp_path / "again" / "images" / "train" / "image_1.h5")["img"][:]
    assert np.array_equal(a, b)


def test_layouts_pass_the_checks(data):
    for task, spec in TASKS.items():
        assert spec.check_layout(data / task) is None


def test_crop_format(data):
    root = data / "crop"
    ids = read_ids(root / "training_data.txt")
    assert ids and all(len(i) == len("chip_000_000") and i.startswith("chip_") for i in ids)
    assert (root / "training_data.txt").read_text().endswith("\n")
    with rasterio.open(root / "training_chips" / f"{ids[0]}_merged.tif") as f:
        assert (f.count, f.height, f.width, f.dtypes[0]) == (18, 224, 224, "int16")
        assert f.crs.to_epsg() == 5070 and f.res == (30.0, 30.0) and f.nodata == -9999
        assert f.read().min() >= 0
    with rasterio.open(root / "training_chips" / f"{ids[0]}.mask.tif") as f:
        mask = f.read(1)
        assert (f.count, f.dtypes[0]) == (1, "uint8") and mask.max() <= 13
        assert (mask == 0).any(), "0 = 'No Data' occurs, as in the real chips"
    header = (root / "chips_df.csv").read_text().splitlines()[0].split(",")
    assert {"chip_id", "first_img_date", "middle_img_date", "last_img_date"} <= set(header)


def test_landslide_format(data):
    root = data / "landslide"
    numbers = sorted(int(p.stem.split("_")[1]) for p in root.glob("images/*/image_*.h5"))
    assert numbers[0] == 1 and numbers == list(range(1, len(numbers) + 1))
    with h5py.File(root / "images" / "train" / "image_1.h5") as f:
        assert f["img"].shape == (128, 128, 14) and f["img"].dtype.kind == "f"
    with h5py.File(root / "annotations" / "train" / "mask_1.h5") as f:
        assert f["mask"].shape == (128, 128) and f["mask"].dtype == np.uint8
        assert set(np.unique(f["mask"][:])) <= {0, 1}


def test_biomass_format(data):
    root = data / "biomass"
    image = sorted((root / "train_images").glob("*_img.tif"))[0]
    assert image.name.count("_") == 3 and image.name.endswith("_tile_img.tif")
    with rasterio.open(image) as f:
        assert (f.count, f.dtypes[0], f.nodata) == (11, "float32", -9999)
        assert f.crs.to_epsg() == 4326
    label = root / "train_labels" / image.name.replace("_img.tif", "_label.tif")
    with rasterio.open(label) as f:
        values = f.read(1)
        assert f.count == 1 and (values == -1).mean() > 0.5, "sparse GEDI-like labels, -1 = no footprint"
        assert values.max() > 0


def test_labels_carry_a_learnable_signal(data):
    """Per-pixel band values separate the classes (what a fine-tuned model can beat a baseline with)."""
    root = data / "landslide"
    with h5py.File(root / "images" / "train" / "image_1.h5") as f:
        img = f["img"][:]
    with h5py.File(root / "annotations" / "train" / "mask_1.h5") as f:
        mask = f["mask"][:]
    red = img[..., 3]
    assert red[mask == 1].mean() - red[mask == 0].mean() > 3 * red[mask == 0].std()


def test_crop_holdout_is_deterministic_and_disjoint(data):
    crop = TASKS["crop"]
    a = crop.holdout_split(data / "crop")
    b = crop.holdout_split(data / "crop")
    assert a == b and a["select"]
    assert not set(a["select"]) & set(a["train"])
    assert set(a["select"]) | set(a["train"]) == set(read_ids(data / "crop" / "training_data.txt"))


@pytest.mark.parametrize("task", ["crop", "landslide"])
def test_terratorch_dataset_classes_read_it(data, task):
    """TerraTorch's dataset-specific readers (not only the generic ones) accept the files."""
    from terratorch.datasets import Landslide4SenseNonGeo, MultiTemporalCropClassification

    if task == "crop":
        ds = MultiTemporalCropClassification(str(data / "crop"), split="val", use_metadata=True)
        sample = ds[0]
        assert tuple(sample["image"].shape) == (6, 3, 224, 224)
        assert sample["mask"].min() >= -1 and sample["mask"].max() <= 12
    else:
        ds = Landslide4SenseNonGeo(str(data / "landslide"), split="test")
        sample = ds[0]
        assert tuple(sample["image"].shape) == (14, 128, 128)
    assert len(ds) > 0
