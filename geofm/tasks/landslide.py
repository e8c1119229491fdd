"""Landslide detection: Landslide4Sense (Sentinel-2 B1-B12, slope, DEM; 128 x 128; 2 classes).

Dataset: https://huggingface.co/datasets/ibm-nasa-geospatial/Landslide4sense
Layout under data_root:
    images/{train,validation,test}/image_N.h5        key 'img', 128x128x14 float, channels last
    annotations/{train,validation,test}/mask_N.h5    key 'mask', 128x128 uint8, 1 = landslide
Checkpoint selected on the official validation split, reported on the official test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geofm.tasks.base import (
    FileFormat,
    SplitFiles,
    Task,
    binary_segmentation,
    h5_options,
    need_dir,
    smooth_field,
    stretch,
)

SPLITS = ("train", "validation", "test")
SIZE = 128


class Landslide(Task):
    def check_layout(self, root: Path) -> str | None:
        for split in SPLITS:
            problem = need_dir(root, f"images/{split}", f"annotations/{split}")
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

    def files(self, root: Path) -> dict[str, SplitFiles]:
        out = {}
        for split in SPLITS:
            # in file-name order, as TerraTorch's Landslide4Sense dataset lists them
            numbers = [p.stem[len("image_") :] for p in sorted((root / "images" / split).glob("image_*.h5"))]
            out[split] = SplitFiles(
                [root / "images" / split / f"image_{n}.h5" for n in numbers],
                [root / "annotations" / split / f"mask_{n}.h5" for n in numbers],
            )
        return out

    def labels(self, root: Path, split: str, splits_dir: Path | None = None):
        import h5py

        for path in sorted((root / "annotations" / split).glob("mask_*.h5")):
            with h5py.File(path, "r") as f:
                yield np.asarray(f["mask"]).astype(np.float32)

    def rgb_panels(self, image_path: Path):
        import h5py

        with h5py.File(image_path, "r") as f:  # channels last: B1, B2 (blue), B3 (green), B4 (red), ...
            data = np.asarray(f["img"])
        return [("RGB", stretch(data[..., [3, 2, 1]]))]

    def write_sample(
        self, root: Path, rng: np.random.Generator, counts: dict[str, int], compressed: bool = True
    ) -> None:
        import h5py

        # Bands are stored divided by a per-band mean, so values sit around 0..2.
        background = np.array([1.0, 0.9, 0.9, 0.8, 1.0, 1.1, 1.2, 1.3, 1.0, 1.0, 0.9, 0.8, 0.4, 1.0])
        landslide = np.array([1.2, 1.4, 1.5, 1.7, 1.3, 1.1, 1.0, 0.8, 1.0, 1.0, 1.5, 1.6, 1.6, 1.0])
        number = 1
        for split, n in counts.items():
            (root / "images" / split).mkdir(parents=True)
            (root / "annotations" / split).mkdir(parents=True)
            for _ in range(n):
                field = smooth_field(rng, SIZE, 16)
                mask = (field > np.quantile(field, 0.8)).astype(np.uint8)  # ~20% landslide pixels
                image = np.where(mask[..., None] == 1, landslide, background)
                image = np.round(image + rng.normal(0, 0.15, image.shape), 3).astype(np.float32)
                with h5py.File(root / "images" / split / f"image_{number}.h5", "w") as f:
                    f.create_dataset("img", data=image, **h5_options(compressed))
                with h5py.File(root / "annotations" / split / f"mask_{number}.h5", "w") as f:
                    f.create_dataset("mask", data=mask, **h5_options(compressed))
                number += 1


TASK = Landslide(
    name="landslide",
    title="Landslide detection (Landslide4Sense, 14 bands)",
    **binary_segmentation("landslide", ("No landslide", "Landslide")),
    selection_split="official validation split",
    test_split="official test split",
    dataset="https://huggingface.co/datasets/ibm-nasa-geospatial/Landslide4sense",
    image_format=FileFormat("h5", bands=14, dtype="float", shape=(SIZE, SIZE), key="img", channels_last=True),
    label_format=FileFormat("h5", bands=1, dtype="uint8", shape=(SIZE, SIZE), key="mask", values=(0, 1)),
    sample_counts={"train": 12, "validation": 4, "test": 4},
    sample_stream=1,  # the stream of the published sample numbers
)
