"""Multi-temporal crop classification: HLS, 3 dates x 6 bands, 13 classes.

Dataset: https://huggingface.co/datasets/ibm-nasa-geospatial/multi-temporal-crop-classification
Layout under data_root:
    training_chips/chip_RRR_CCC_merged.tif   18 bands int16 (time-major: B, G, R, NIR, SWIR1, SWIR2
                                             x 3 dates), EPSG:5070, 30 m, nodata -9999
    training_chips/chip_RRR_CCC.mask.tif     uint8, 0 = No Data, 1..13 = classes
    validation_chips/...                     the same
    training_data.txt, validation_data.txt   chip ids, one per line
The dataset has no test split and TerraTorch's crop datamodule validates and tests on the
validation chips: the checkpoint is selected on a hold-out of the training chips instead, and
only the official validation chips are reported.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from geofm.tasks.base import (
    HOLDOUT_TASK,
    SEGMENTATION,
    FileFormat,
    SplitFiles,
    Task,
    blobs,
    gtiff,
    need_dir,
    pairs_problem,
    read_ids,
    read_tif_label,
    split_ids_problem,
    stretch,
    write_tif,
)

CLASSES = (
    "Natural Vegetation", "Forest", "Corn", "Soybeans", "Wetlands", "Developed / Barren",
    "Open Water", "Winter Wheat", "Alfalfa", "Fallow / Idle Cropland", "Cotton", "Sorghum", "Other",
)  # fmt: skip
SPLITS = {"training": "training_chips", "validation": "validation_chips"}
IMAGE, MASK = "_merged.tif", ".mask.tif"
SIZE = 224


class Crop(Task):
    def check_layout(self, root: Path) -> str | None:
        for split, rel in SPLITS.items():
            folder = root / rel
            problem = need_dir(root, rel) or pairs_problem(
                sorted(folder.glob(f"*{IMAGE}")), sorted(folder.glob(f"*{MASK}")), IMAGE, MASK, folder
            )
            if problem:
                return problem
            split_file = root / f"{split}_data.txt"
            if not split_file.is_file():
                return f"missing split file {split_file}; fix: download it beside {rel}/"
            problem = split_ids_problem(read_ids(split_file), _chip_ids(folder), split_file)
            if problem:
                return problem
        return None

    def files(self, root: Path) -> dict[str, SplitFiles]:
        out = {}
        for split, rel in SPLITS.items():
            folder, list_file = root / rel, root / f"{split}_data.txt"
            ids = _chip_ids(folder)
            listed = read_ids(list_file) if list_file.is_file() else []
            out[split] = SplitFiles(
                [folder / f"{c}{IMAGE}" for c in ids], [folder / f"{c}{MASK}" for c in ids], list_file, listed
            )
        return out

    def training_ids(self, root: Path) -> list[str]:
        return read_ids(root / "training_data.txt")

    def test_ids(self, root: Path) -> list[str]:
        return read_ids(root / "validation_data.txt")

    def labels(self, root: Path, split: str, splits_dir: Path | None = None):
        if split == "train":
            ids, folder = read_ids(splits_dir / "train.txt"), root / SPLITS["training"]
        else:
            ids, folder = self.test_ids(root), root / SPLITS["validation"]
        for chip in ids:
            yield read_tif_label(folder / f"{chip}{MASK}", zero_is_nodata=True)

    def rgb_panels(self, image_path: Path):
        import rasterio

        with rasterio.open(image_path) as f:
            data = f.read()
        return [(f"RGB t{t + 1}", stretch(data[[6 * t + 2, 6 * t + 1, 6 * t]].transpose(1, 2, 0))) for t in range(3)]

    def write_sample(
        self, root: Path, rng: np.random.Generator, counts: dict[str, int], compressed: bool = True
    ) -> None:
        from rasterio.transform import from_origin

        # One spectral signature per class and time step (reflectance x 10000), shared by all chips.
        signatures = rng.uniform(300, 4200, (13, 3, 6))
        class_weights = np.linspace(3, 0.5, 13)
        class_weights /= class_weights.sum()
        rows, used = [], set()
        for split, n in counts.items():
            folder = root / f"{split}_chips"
            folder.mkdir(parents=True)
            ids = []
            while len(ids) < n:
                chip = f"chip_{rng.integers(0, 300):03d}_{rng.integers(0, 500):03d}"
                if chip not in used:
                    used.add(chip)
                    ids.append(chip)
            for chip in ids:
                regions = blobs(rng, SIZE, 14)
                classes = rng.choice(13, size=14, p=class_weights) + 1  # 1..13; 0 = no data
                mask = classes[regions].astype(np.uint8)
                mask[:, :4] = 0  # a strip of "No Data", as at real chip edges
                image = signatures[np.maximum(mask, 1) - 1]  # (h, w, t, b)
                image = image + rng.normal(0, 60, image.shape)
                image = np.clip(image, 0, 10000).astype(np.int16)
                image = image.reshape(SIZE, SIZE, 18).transpose(2, 0, 1)  # time-major bands
                x0, y0 = 100000 + 6720 * int(chip[5:8]), 2000000 + 6720 * int(chip[9:12])
                profile = gtiff(
                    compressed, width=SIZE, height=SIZE, crs="EPSG:5070", transform=from_origin(x0, y0, 30, 30)
                )
                write_tif(folder / f"{chip}{IMAGE}", image, profile, nodata=-9999)
                write_tif(folder / f"{chip}{MASK}", mask[None], profile)
                rows.append({"chip_id": chip, "first_img_date": "2022-03-15", "middle_img_date": "2022-06-20",
                             "last_img_date": "2022-09-25"})  # fmt: skip
            (root / f"{split}_data.txt").write_text("".join(f"{c}\n" for c in ids))
        with open(root / "chips_df.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _chip_ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len(IMAGE)] for p in folder.glob(f"*{IMAGE}"))


TASK = Crop(
    name="crop",
    title="Multi-temporal crop classification (HLS, 13 classes)",
    dataset="https://huggingface.co/datasets/ibm-nasa-geospatial/multi-temporal-crop-classification",
    class_names=CLASSES,
    kind=SEGMENTATION,
    headline="mIoU",
    higher_is_better=True,
    key_metrics=("mIoU", "mAcc", "pixel_accuracy"),
    definitions={
        "mIoU": "headline; mean over the 13 classes of IoU = TP/(TP+FP+FN), pixels labelled 'No Data' "
        "(ignore index -1) excluded; a class with no pixels in labels or predictions is left out of the mean",
        "IoU_<class>": "per-class IoU as above",
        "Acc_<class>": "per-class accuracy (recall) = TP/(TP+FN)",
        "mAcc": "mean of the per-class accuracies (same exclusions as mIoU)",
        "pixel_accuracy": "correct / all labelled pixels (micro)",
    },
    **HOLDOUT_TASK,
    image_suffix=IMAGE,
    selection_metric="val/mIoU",
    image_format=FileFormat("tif", bands=18, dtype="int16", shape=(SIZE, SIZE), georeferenced=True, nodata=-9999),
    label_format=FileFormat(
        "tif", bands=1, dtype="uint8", shape=(SIZE, SIZE), georeferenced=True, values=tuple(range(14))
    ),
    sample_counts={"training": 10, "validation": 3},
    sample_stream=0,  # the stream of the published sample numbers
)
