"""The three downstream tasks: on-disk layout, splits, headline metrics and how to show a chip.

Layouts follow the real downloads (see README, "Datasets"); the sample data generator
(geofm.sample_data) writes exactly these layouts, so a real dataset drops in unchanged.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CROP_CLASSES = [
    "Natural Vegetation", "Forest", "Corn", "Soybeans", "Wetlands", "Developed / Barren",
    "Open Water", "Winter Wheat", "Alfalfa", "Fallow / Idle Cropland", "Cotton", "Sorghum", "Other",
]  # fmt: skip
LANDSLIDE_CLASSES = ["No landslide", "Landslide"]
BIOMASS_BINS = [0, 50, 100, 150, 200, 300, 1e9]  # Mg/ha; RMSE is also reported per bin

# The pinned metric definitions, written into every output (here, not in geofm.metrics, so
# the summary and aggregation steps need not import torch).
DEFINITIONS = {
    "crop": {
        "mIoU": "headline; mean over the 13 classes of IoU = TP/(TP+FP+FN), pixels labelled 'No Data' "
        "(ignore index -1) excluded; a class with no pixels in labels or predictions is left out of the mean",
        "IoU_<class>": "per-class IoU as above",
        "Acc_<class>": "per-class accuracy (recall) = TP/(TP+FN)",
        "mAcc": "mean of the per-class accuracies (same exclusions as mIoU)",
        "pixel_accuracy": "correct / all labelled pixels (micro)",
    },
    "landslide": {
        "landslide_IoU": "headline; IoU of the landslide class only (class 1)",
        "landslide_F1": "F1 of the landslide class only = 2TP/(2TP+FP+FN) (not pixel accuracy)",
        "landslide_precision": "TP/(TP+FP) of the landslide class",
        "landslide_recall": "TP/(TP+FN) of the landslide class",
        "mIoU": "mean IoU over both classes",
        "pixel_accuracy": "correct / all labelled pixels (micro)",
    },
    "biomass": {
        "RMSE": "headline; root mean squared error in Mg/ha over labelled pixels (label -1 = no GEDI footprint, excluded)",
        "MAE": "mean absolute error in Mg/ha over labelled pixels",
        "R2": "coefficient of determination over labelled pixels",
        "RMSE_bin_<lo>-<hi>": "RMSE over labelled pixels whose true biomass is in [lo, hi) Mg/ha",
    },
}
HOLDOUT_PERCENT = 20  # share of crop training chips held out to select the checkpoint


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    kind: str  # "segmentation" or "regression"
    headline: str  # pinned metric that ranks models
    higher_is_better: bool
    selection_split: str  # honest labels, written into every output
    test_split: str
    class_names: list[str] = field(default_factory=list)
    check_layout: Callable[[Path], str | None] = lambda root: None
    split_files: Callable[[Path], dict[str, list[Path]]] = lambda root: {}
    units: str = ""


# ---------------------------------------------------------------- layout checks
def _need_dir(root: Path, rel: str) -> str | None:
    if not (root / rel).is_dir():
        return f"missing folder {root / rel}; fix: point data_root at the dataset's top folder"
    return None


def _pairs(images: list[Path], labels: list[Path], img_suffix: str, lbl_suffix: str, where: Path):
    if not images:
        return f"no *{img_suffix} files in {where}; fix: extract the split there"
    stems = {p.name[: -len(img_suffix)] for p in images}
    label_stems = {p.name[: -len(lbl_suffix)] for p in labels}
    missing = sorted(stems - label_stems)
    if missing:
        return f"image {missing[0]}{img_suffix} in {where} has no {missing[0]}{lbl_suffix}; fix: add the label or remove the image"
    extra = sorted(label_stems - stems)
    if extra:
        return f"label {extra[0]}{lbl_suffix} has no image; fix: add the image or remove the label"
    return None


def _check_split_ids(ids: list[str], chip_ids: list[str], split_file: Path) -> str | None:
    if not ids:
        return f"{split_file} lists no chips; fix: list one chip id per line"
    known = set(chip_ids)
    for chip in ids:
        if chip not in known:
            return f"{split_file} names chip {chip!r} which does not exist; fix: remove it or add the chip"
    # TerraTorch matches split ids as substrings: 'chip_1' would also select 'chip_10'.
    ordered = sorted(chip_ids)
    for chip in ids:
        i = bisect.bisect_right(ordered, chip)
        if i < len(ordered) and ordered[i].startswith(chip):
            return (
                f"{split_file}: id {chip!r} is a prefix of chip {ordered[i]!r} and TerraTorch "
                "would load both; fix: use zero-padded ids (chip_000_001)"
            )
    return None


def read_ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def crop_chip_ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_merged.tif")] for p in folder.glob("*_merged.tif"))


def check_crop(root: Path) -> str | None:
    for rel, split_file in (("training_chips", "training_data.txt"), ("validation_chips", "validation_data.txt")):
        problem = _need_dir(root, rel)
        if problem:
            return problem
        folder = root / rel
        problem = _pairs(
            sorted(folder.glob("*_merged.tif")), sorted(folder.glob("*.mask.tif")), "_merged.tif", ".mask.tif", folder
        )
        if problem:
            return problem
        if not (root / split_file).is_file():
            return f"missing split file {root / split_file}; fix: download it beside {rel}/"
        problem = _check_split_ids(read_ids(root / split_file), crop_chip_ids(folder), root / split_file)
        if problem:
            return problem
    return None


def check_landslide(root: Path) -> str | None:
    for split in ("train", "validation", "test"):
        for rel in (f"images/{split}", f"annotations/{split}"):
            problem = _need_dir(root, rel)
            if problem:
                return problem
        images = sorted((root / "images" / split).glob("image_*.h5"))
        masks = sorted((root / "annotations" / split).glob("mask_*.h5"))
        if not images:
            return f"no image_*.h5 files in {root / 'images' / split}; fix: extract the {split} split there"
        image_ids = {p.stem[len("image_") :] for p in images}
        mask_ids = {p.stem[len("mask_") :] for p in masks}
        if image_ids != mask_ids:
            odd = sorted(image_ids ^ mask_ids)[0]
            return f"images/{split} and annotations/{split} differ at number {odd}; fix: every image_N.h5 needs a mask_N.h5"
    return None


def check_biomass(root: Path) -> str | None:
    for split in ("train", "val", "test"):
        for rel in (f"{split}_images", f"{split}_labels"):
            problem = _need_dir(root, rel)
            if problem:
                return problem
        problem = _pairs(
            sorted((root / f"{split}_images").glob("*_img.tif")),
            sorted((root / f"{split}_labels").glob("*_label.tif")),
            "_img.tif",
            "_label.tif",
            root / f"{split}_images",
        )
        if problem:
            return problem
    return None


# ---------------------------------------------------------------- split listings
def crop_files(root: Path) -> dict[str, list[Path]]:
    out = {}
    for split, rel in (("training", "training_chips"), ("validation", "validation_chips")):
        out[split] = sorted((root / rel).glob("*_merged.tif")) + sorted((root / rel).glob("*.mask.tif"))
        out[split].append(root / f"{split}_data.txt")
    return out


def landslide_files(root: Path) -> dict[str, list[Path]]:
    return {
        s: sorted((root / "images" / s).glob("image_*.h5")) + sorted((root / "annotations" / s).glob("mask_*.h5"))
        for s in ("train", "validation", "test")
    }


def biomass_files(root: Path) -> dict[str, list[Path]]:
    return {
        s: sorted((root / f"{s}_images").glob("*_img.tif")) + sorted((root / f"{s}_labels").glob("*_label.tif"))
        for s in ("train", "val", "test")
    }


def crop_selection_split(root: Path) -> dict[str, list[str]]:
    """Deterministic hold-out of the training chips, by a hash of the chip id.

    Hashing (not position) keeps a chip on the same side when chips are added or removed.
    """
    train_ids = read_ids(root / "training_data.txt")

    def held_out(chip: str) -> bool:
        return int(hashlib.sha256(chip.encode()).hexdigest(), 16) % 100 < HOLDOUT_PERCENT

    select = [c for c in train_ids if held_out(c)]
    if not select:  # tiny datasets: still hold out at least one chip
        select = train_ids[-1:]
    train = [c for c in train_ids if c not in set(select)]
    return {"train": train, "select": select, "test": read_ids(root / "validation_data.txt")}


TASKS: dict[str, TaskSpec] = {
    "crop": TaskSpec(
        name="crop",
        title="Multi-temporal crop classification (HLS, 13 classes)",
        kind="segmentation",
        headline="mIoU",
        higher_is_better=True,
        selection_split=f"hold-out of {HOLDOUT_PERCENT}% of the official training chips (by chip-id hash)",
        test_split="official validation chips (the dataset has no test split)",
        class_names=CROP_CLASSES,
        check_layout=check_crop,
        split_files=crop_files,
    ),
    "landslide": TaskSpec(
        name="landslide",
        title="Landslide detection (Landslide4Sense, 14 bands)",
        kind="segmentation",
        headline="landslide_IoU",
        higher_is_better=True,
        selection_split="official validation split",
        test_split="official test split",
        class_names=LANDSLIDE_CLASSES,
        check_layout=check_landslide,
        split_files=landslide_files,
    ),
    "biomass": TaskSpec(
        name="biomass",
        title="Above-ground biomass regression (granite-geospatial-biomass, HLS)",
        kind="regression",
        headline="RMSE",
        higher_is_better=False,
        selection_split="official val split",
        test_split="official test split",
        check_layout=check_biomass,
        split_files=biomass_files,
        units="Mg/ha",
    ),
}


# ---------------------------------------------------------------- raw labels (baselines)
def _tif_label(path: Path, zero_is_nodata: bool) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as f:
        data = f.read(1, masked=True)
    label = data.filled(-1 if not zero_is_nodata else 0).astype(np.float32)
    if zero_is_nodata:  # crop masks: 0 = No Data, classes 1..13 -> 0..12
        label = label - 1
    return label


def labels(task: str, root: Path, split: str, splits_dir: Path | None = None):
    """Yield the label maps of a split ('train' or 'test') as TerraTorch sees them
    (ignored pixels = -1). Used for the trivial baselines, not for training."""
    import h5py

    if task == "crop":
        ids = read_ids(splits_dir / "train.txt") if split == "train" else read_ids(root / "validation_data.txt")
        folder = root / ("training_chips" if split == "train" else "validation_chips")
        for chip in ids:
            yield _tif_label(folder / f"{chip}.mask.tif", zero_is_nodata=True)
    elif task == "landslide":
        for path in sorted((root / "annotations" / split).glob("mask_*.h5")):
            with h5py.File(path, "r") as f:
                yield np.asarray(f["mask"]).astype(np.float32)
    else:
        for path in sorted((root / f"{split}_labels").glob("*_label.tif")):
            yield _tif_label(path, zero_is_nodata=False)
