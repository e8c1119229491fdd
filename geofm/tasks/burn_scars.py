"""Burn scar segmentation: HLS Burn Scars (HLS S30/L30, 6 bands, 512 x 512, burned / not burned).

Dataset: https://huggingface.co/datasets/ibm-nasa-geospatial/hls_burn_scars
Layout under data_root:
    training/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4_merged.tif   6 bands float32 reflectance
                                     (blue, green, red, NIR narrow, SWIR1, SWIR2), UTM, 30 m
    training/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4.mask.tif     1 = burned, 0 = not, -1 = no data
    validation/...                                                     the same
(a mask named <stem>_merged.mask.tif is accepted too). Like crop, there is no test split and
TerraTorch's own example tests on the validation chips: the checkpoint is selected on a
hold-out of the training chips, and only the official validation chips are reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geofm.tasks.base import (
    HOLDOUT_TASK,
    FileFormat,
    SplitFiles,
    Task,
    binary_segmentation,
    gtiff,
    need_dir,
    read_tif_label,
    smooth_field,
    write_tif,
)

SPLITS = {"train": "training", "test": "validation"}
IMAGE, MASKS = "_merged.tif", ("_merged.mask.tif", ".mask.tif")
SIZE = 512


def _stem(path: Path) -> str | None:
    name = path.name
    for suffix in MASKS:  # longest first: '_merged.mask.tif' ends with '.mask.tif' too
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name[: -len(IMAGE)] if name.endswith(IMAGE) else None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{IMAGE}") if not p.name.endswith(MASKS))


def _masks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.mask.tif"))


class BurnScars(Task):
    def check_layout(self, root: Path) -> str | None:
        for rel in SPLITS.values():
            folder = root / rel
            if need_dir(root, rel):
                return need_dir(root, rel)
            images, masks = {_stem(p) for p in _images(folder)}, {_stem(p) for p in _masks(folder)}
            if not images:
                return f"no *{IMAGE} files in {folder}; fix: extract the {rel} split there"
            if images != masks:
                odd = sorted(images ^ masks)[0]
                return (
                    f"{folder}: chip {odd} has an image or a mask but not both; fix: every *{IMAGE} needs its .mask.tif"
                )
        return None

    def files(self, root: Path) -> dict[str, SplitFiles]:
        out = {}
        for rel in SPLITS.values():
            masks = {_stem(m): m for m in _masks(root / rel)}
            images = _images(root / rel)
            out[rel] = SplitFiles(images, [masks.get(_stem(i), root / rel / f"{_stem(i)}.mask.tif") for i in images])
        return out

    def training_ids(self, root: Path) -> list[str]:
        return [_stem(p) for p in _images(root / SPLITS["train"])]

    def test_ids(self, root: Path) -> list[str]:
        return [_stem(p) for p in _images(root / SPLITS["test"])]

    def labels(self, root: Path, split: str, splits_dir: Path | None = None):
        folder = root / SPLITS[split]
        wanted = set((splits_dir / "train.txt").read_text().split()) if split == "train" else None
        for mask in _masks(folder):
            if wanted is None or _stem(mask) in wanted:
                yield read_tif_label(mask)

    def write_sample(
        self, root: Path, rng: np.random.Generator, counts: dict[str, int], compressed: bool = True
    ) -> None:
        from rasterio.transform import from_origin

        # Reflectance (0-1) of unburned vegetation and of a fresh burn scar (dark NIR, bright SWIR2).
        unburned = np.array([0.035, 0.060, 0.055, 0.280, 0.190, 0.100], np.float32)
        burned = np.array([0.040, 0.050, 0.060, 0.120, 0.230, 0.220], np.float32)
        tiles = ["T10SDH", "T11SKU", "T13TDE", "T12SVE"]
        used: set[str] = set()
        for split, n in counts.items():
            folder = root / split
            folder.mkdir(parents=True)
            for _ in range(n):
                stem = ""
                while not stem or stem in used:
                    tile, day = tiles[rng.integers(0, len(tiles))], rng.integers(2018001, 2021365)
                    stem = f"subsetted_512x512_HLS.S30.{tile}.{day}.v1.4"
                used.add(stem)
                field = smooth_field(rng, SIZE, 64)
                mask = (field > np.quantile(field, 0.75)).astype(np.int16)  # ~25% burned
                mask[-6:, :] = -1  # a strip without data, as at real scene edges
                image = np.where((mask == 1)[..., None], burned, unburned)
                # reflectance to 3 decimals: compresses well, keeps the sample data small
                image = np.round((image + rng.normal(0, 0.01, image.shape)).clip(0, 1), 3).astype(np.float32)
                profile = gtiff(compressed, width=SIZE, height=SIZE, crs="EPSG:32610",
                               transform=from_origin(rng.uniform(3e5, 7e5), rng.uniform(3.8e6, 4.6e6), 30, 30))  # fmt: skip
                write_tif(folder / f"{stem}{IMAGE}", image.transpose(2, 0, 1), profile)
                write_tif(folder / f"{stem}.mask.tif", mask[None], profile)


TASK = BurnScars(
    name="burn_scars",
    title="Burn scar segmentation (HLS Burn Scars, 6 bands)",
    **binary_segmentation("burned", ("Not burned", "Burned")),
    **HOLDOUT_TASK,
    dataset="https://huggingface.co/datasets/ibm-nasa-geospatial/hls_burn_scars",
    image_suffix=IMAGE,
    rgb_bands=(3, 2, 1),  # red, green, blue
    image_format=FileFormat("tif", bands=6, dtype="float32", shape=(SIZE, SIZE), georeferenced=True, same_crs=False),
    label_format=FileFormat("tif", bands=1, dtype="int16", shape=(SIZE, SIZE), georeferenced=True, values=(-1, 0, 1)),
    default_enabled=False,  # the default experiment keeps its three tasks and its run time
    sample_counts={"training": 6, "validation": 2},
)
