"""Above-ground biomass regression: granite-geospatial-biomass (HLS L30 composites, AGB in Mg/ha).

Dataset: https://zenodo.org/records/12356481 (the `all_ecos_datasplit/` folder of the download)
Layout under data_root:
    {train,val,test}_images/<tile>_<n>_tile_img.tif   11 bands float32 (B01, blue, green, red, NIR,
                                                      SWIR1, SWIR2, cirrus, TIRS1, TIRS2, Fmask),
                                                      of which the 6 HLS bands are used; nodata -9999
    {train,val,test}_labels/<tile>_<n>_tile_label.tif  float32 Mg/ha, -1 = no GEDI footprint
Checkpoint selected on the official val split, reported on the official test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geofm.tasks.base import (
    REGRESSION,
    FileFormat,
    SplitFiles,
    Task,
    gtiff,
    need_dir,
    pairs_problem,
    read_tif_label,
    smooth_field,
    write_tif,
)

SPLITS = ("train", "val", "test")
IMAGE, LABEL = "_img.tif", "_label.tif"
SIZE = 224


class Biomass(Task):
    def check_layout(self, root: Path) -> str | None:
        for split in SPLITS:
            problem = need_dir(root, f"{split}_images", f"{split}_labels") or pairs_problem(
                sorted((root / f"{split}_images").glob(f"*{IMAGE}")),
                sorted((root / f"{split}_labels").glob(f"*{LABEL}")),
                IMAGE,
                LABEL,
                root / f"{split}_images",
            )
            if problem:
                return problem
        return None

    def files(self, root: Path) -> dict[str, SplitFiles]:
        out = {}
        for split in SPLITS:
            stems = [p.name.removesuffix(IMAGE) for p in sorted((root / f"{split}_images").glob(f"*{IMAGE}"))]
            out[split] = SplitFiles(
                [root / f"{split}_images" / f"{s}{IMAGE}" for s in stems],
                [root / f"{split}_labels" / f"{s}{LABEL}" for s in stems],
            )
        return out

    def labels(self, root: Path, split: str, splits_dir: Path | None = None):
        for path in sorted((root / f"{split}_labels").glob(f"*{LABEL}")):
            yield read_tif_label(path)

    def write_sample(
        self, root: Path, rng: np.random.Generator, counts: dict[str, int], compressed: bool = True
    ) -> None:
        from rasterio.transform import from_origin

        bare = np.array([600, 700, 1000, 1300, 2200, 2800, 2200, 10, 2900, 2800, 64], float)
        forest = np.array([300, 350, 600, 400, 3600, 1800, 900, 10, 2900, 2800, 64], float)
        tiles = ["T10SFF", "T33TUM", "T47PRR"]
        for split, n in counts.items():
            images, labels = root / f"{split}_images", root / f"{split}_labels"
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
            for _ in range(n):
                stem = f"{tiles[rng.integers(0, 3)]}_{rng.integers(0, 1000)}_tile"
                while (images / f"{stem}{IMAGE}").exists():
                    stem = f"{tiles[rng.integers(0, 3)]}_{rng.integers(0, 1000)}_tile"
                density = smooth_field(rng, SIZE, 28)  # 0 = bare, 1 = dense forest
                # Mg/ha of a sparse shrubland (0-12): near unit scale, so a few epochs from random init
                # learn it (at 100+ Mg/ha the output scale alone takes hundreds of AdamW steps).
                agb = (12 * density**1.5).astype(np.float32)
                image = bare + (forest - bare) * density[..., None]
                image = image + rng.normal(0, 40, image.shape) * (np.arange(11) < 7)
                image = np.round(image).transpose(2, 0, 1).astype(np.float32)  # integer composites
                # Sparse GEDI-like footprints along a few tracks; -1 where there is no shot.
                label = np.full((SIZE, SIZE), -1, np.float32)
                for col in rng.choice(SIZE, 12, replace=False):
                    rows = np.arange(rng.integers(0, 3), SIZE, 2)
                    label[rows, col] = agb[rows, col]
                lon0, lat0 = rng.uniform(-120, 30), rng.uniform(-30, 60)
                profile = gtiff(compressed, width=SIZE, height=SIZE, crs="EPSG:4326",
                               transform=from_origin(lon0, lat0, 0.00027, 0.00027))  # fmt: skip
                write_tif(images / f"{stem}{IMAGE}", image, profile, nodata=-9999)
                write_tif(labels / f"{stem}{LABEL}", label[None], profile, nodata=-1)


TASK = Biomass(
    name="biomass",
    title="Above-ground biomass regression (granite-geospatial-biomass, HLS)",
    kind=REGRESSION,
    headline="RMSE",
    higher_is_better=False,
    key_metrics=("RMSE", "MAE", "R2"),
    definitions={
        "RMSE": "headline; root mean squared error in Mg/ha over labelled pixels (label -1 = no GEDI footprint, excluded)",
        "MAE": "mean absolute error in Mg/ha over labelled pixels",
        "R2": "coefficient of determination over labelled pixels",
        "RMSE_bin_<lo>-<hi>": "RMSE over labelled pixels whose true biomass is in [lo, hi) Mg/ha",
    },
    selection_split="official val split",
    test_split="official test split",
    dataset="https://zenodo.org/records/12356481",
    value_bins=(0, 50, 100, 150, 200, 300, 1e9),
    units="Mg/ha",
    image_suffix=IMAGE,
    rgb_bands=(4, 3, 2),  # red, green, blue
    selection_metric="val/RMSE",
    selection_mode="min",
    image_format=FileFormat(
        "tif",
        bands=11,
        dtype="float32",
        shape=(SIZE, SIZE),
        georeferenced=True,
        nodata=-9999,
        unused_bands=(1, 8, 9, 10, 11),  # B01 and the non-HLS placeholders: the recipe reads bands 2-7
    ),  # fmt: skip
    label_format=FileFormat(
        "tif", bands=1, dtype="float32", shape=(SIZE, SIZE), georeferenced=True, nodata=-1, values=(-1,), minimum=0
    ),
    sample_counts={"train": 10, "val": 3, "test": 3},
    sample_stream=2,  # the stream of the published sample numbers
)
