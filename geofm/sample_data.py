"""Small, seeded synthetic datasets in each real dataset's on-disk format.

File and folder names, split files, band counts and order, dtypes, nodata values, CRS and
transforms follow the real downloads (README, "Datasets"), so pointing data_root at the real
data changes nothing else. Labels are a function of the bands (per-class spectral signatures,
biomass driving NIR and red), so a fine-tuned model can beat a trivial baseline.
Files are compressed (transparent to rasterio and h5py) to keep all three under 50 MB.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import rasterio
from rasterio.transform import from_origin

CROP_SIZE, LANDSLIDE_SIZE, BIOMASS_SIZE = 224, 128, 224
COUNTS = {
    "crop": {"training": 10, "validation": 3},
    "landslide": {"train": 12, "validation": 4, "test": 4},
    "biomass": {"train": 10, "val": 3, "test": 3},
}
GTIFF = {"driver": "GTiff", "compress": "deflate", "tiled": True, "blockxsize": 112, "blockysize": 112}


def _blobs(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Voronoi regions: index of the nearest of n random centres for every pixel."""
    centres = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return d.argmin(0)


def _smooth_field(rng: np.random.Generator, size: int, scale: int = 32) -> np.ndarray:
    """A smooth random field in [0, 1] (bilinear upsampling of coarse noise)."""
    coarse = rng.uniform(0, 1, (size // scale + 2, size // scale + 2))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


# ---------------------------------------------------------------- crop (HLS, EPSG:5070)
def write_crop(root: Path, rng: np.random.Generator, counts: dict) -> None:
    # One spectral signature per class and time step (reflectance x 10000), shared by all chips.
    signatures = rng.uniform(300, 4200, (13, 3, 6))
    class_weights = np.linspace(3, 0.5, 13)
    class_weights /= class_weights.sum()
    rows = []
    used = set()
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
            regions = _blobs(rng, CROP_SIZE, 14)
            classes = rng.choice(13, size=14, p=class_weights) + 1  # 1..13; 0 = no data
            mask = classes[regions].astype(np.uint8)
            mask[:, :4] = 0  # a strip of "No Data", as at real chip edges
            image = signatures[np.maximum(mask, 1) - 1]  # (h, w, t, b)
            image = image + rng.normal(0, 60, image.shape)
            image = np.clip(image, 0, 10000).astype(np.int16)
            image = image.reshape(CROP_SIZE, CROP_SIZE, 18).transpose(2, 0, 1)  # time-major bands
            x0, y0 = 100000 + 6720 * int(chip[5:8]), 2000000 + 6720 * int(chip[9:12])
            profile = dict(
                GTIFF, width=CROP_SIZE, height=CROP_SIZE, crs="EPSG:5070", transform=from_origin(x0, y0, 30, 30)
            )
            with rasterio.open(
                folder / f"{chip}_merged.tif", "w", count=18, dtype="int16", nodata=-9999, **profile
            ) as f:
                f.write(image)
            with rasterio.open(folder / f"{chip}.mask.tif", "w", count=1, dtype="uint8", **profile) as f:
                f.write(mask[None])
            rows.append({
                "chip_id": chip,
                "first_img_date": "2022-03-15",
                "middle_img_date": "2022-06-20",
                "last_img_date": "2022-09-25",
            })  # fmt: skip
        (root / f"{split}_data.txt").write_text("".join(f"{c}\n" for c in ids))
    with open(root / "chips_df.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- landslide (h5, channels last)
def write_landslide(root: Path, rng: np.random.Generator, counts: dict) -> None:
    # Bands are stored divided by a per-band mean, so values sit around 0..2.
    background = np.array([1.0, 0.9, 0.9, 0.8, 1.0, 1.1, 1.2, 1.3, 1.0, 1.0, 0.9, 0.8, 0.4, 1.0])
    landslide = np.array([1.2, 1.4, 1.5, 1.7, 1.3, 1.1, 1.0, 0.8, 1.0, 1.0, 1.5, 1.6, 1.6, 1.0])
    number = 1
    for split, n in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for _ in range(n):
            field = _smooth_field(rng, LANDSLIDE_SIZE, 16)
            mask = (field > np.quantile(field, 0.8)).astype(np.uint8)  # ~20% landslide pixels
            image = np.where(mask[..., None] == 1, landslide, background)
            image = np.round(image + rng.normal(0, 0.15, image.shape), 3).astype(np.float32)
            with h5py.File(root / "images" / split / f"image_{number}.h5", "w") as f:
                f.create_dataset("img", data=image, compression="gzip")
            with h5py.File(root / "annotations" / split / f"mask_{number}.h5", "w") as f:
                f.create_dataset("mask", data=mask, compression="gzip")
            number += 1


# ---------------------------------------------------------------- biomass (HLS L30, EPSG:4326)
def write_biomass(root: Path, rng: np.random.Generator, counts: dict) -> None:
    # 11 bands: B01, BLUE, GREEN, RED, NIR, SWIR1, SWIR2, cirrus, TIRS1, TIRS2, Fmask.
    bare = np.array([600, 700, 1000, 1300, 2200, 2800, 2200, 10, 2900, 2800, 64], float)
    forest = np.array([300, 350, 600, 400, 3600, 1800, 900, 10, 2900, 2800, 64], float)
    tiles = ["T10SFF", "T33TUM", "T47PRR"]
    for split, n in counts.items():
        images, labels = root / f"{split}_images", root / f"{split}_labels"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for _ in range(n):
            stem = f"{tiles[rng.integers(0, 3)]}_{rng.integers(0, 1000)}_tile"
            while (images / f"{stem}_img.tif").exists():
                stem = f"{tiles[rng.integers(0, 3)]}_{rng.integers(0, 1000)}_tile"
            density = _smooth_field(rng, BIOMASS_SIZE, 28)  # 0 = bare, 1 = dense forest
            # Mg/ha of a sparse shrubland (0-12): near unit scale, so a few epochs from random init
            # learn it (at 100+ Mg/ha the output scale alone takes hundreds of AdamW steps).
            agb = (12 * density**1.5).astype(np.float32)
            image = bare + (forest - bare) * density[..., None]
            image = image + rng.normal(0, 40, image.shape) * (np.arange(11) < 7)
            image = np.round(image).transpose(2, 0, 1).astype(np.float32)  # integer composites
            # Sparse GEDI-like footprints along a few tracks; -1 where there is no shot.
            label = np.full((BIOMASS_SIZE, BIOMASS_SIZE), -1, np.float32)
            for col in rng.choice(BIOMASS_SIZE, 12, replace=False):
                rows = np.arange(rng.integers(0, 3), BIOMASS_SIZE, 2)
                label[rows, col] = agb[rows, col]
            lon0, lat0 = rng.uniform(-120, 30), rng.uniform(-30, 60)
            profile = dict(
                GTIFF,
                width=BIOMASS_SIZE,
                height=BIOMASS_SIZE,
                crs="EPSG:4326",
                transform=from_origin(lon0, lat0, 0.00027, 0.00027),
            )
            with rasterio.open(
                images / f"{stem}_img.tif", "w", count=11, dtype="float32", nodata=-9999, **profile
            ) as f:
                f.write(image)
            with rasterio.open(labels / f"{stem}_label.tif", "w", count=1, dtype="float32", nodata=-1, **profile) as f:
                f.write(label[None])


WRITERS = {"crop": write_crop, "landslide": write_landslide, "biomass": write_biomass}


def write(task: str, root: Path, seed: int, counts: dict | None = None) -> None:
    """Write one task's sample dataset into root (replaced if it exists); `counts` changes the
    number of chips per split (benchmarks use more)."""
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    offset = {"crop": 0, "landslide": 1, "biomass": 2}[task]
    WRITERS[task](tmp, np.random.default_rng([seed, offset]), counts or COUNTS[task])
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
