"""What every task is: its metadata, and the hooks generic code calls (never a task's name).

A task module (geofm/tasks/<name>.py) subclasses `Task`, fills in its metadata and overrides
the hooks that differ from the defaults here; `geofm.tasks` finds it (see its docstring).
Generic code only asks the task: which files form a split, whether the layout is right, which
labels a split holds, how to draw a chip, which metrics to report, how to write sample data.
"""

from __future__ import annotations

import bisect
import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
HOLDOUT_PERCENT = 20  # share of training chips held out to select the checkpoint (holdout tasks)
SEGMENTATION, REGRESSION = "segmentation", "regression"
# Split labels shared by the tasks without a usable validation split upstream.
HOLDOUT_SPLIT = f"hold-out of {HOLDOUT_PERCENT}% of the official training chips (by chip-id hash)"
VALIDATION_AS_TEST = "official validation chips (the dataset has no test split)"
# What such a task (training and validation chips only) says about its splits, as Task fields.
HOLDOUT_TASK = {
    "holdout": True,
    "selection_split": HOLDOUT_SPLIT,
    "test_split": VALIDATION_AS_TEST,
    "split_labels": {"training": "official training chips", "validation": VALIDATION_AS_TEST},
}


def binary_segmentation(name: str, class_names: tuple[str, str], index: int = 1) -> dict:
    """The fields of a binary segmentation task scored on its positive class `name` (class
    `index`): its IoU is the headline, beside its F1 and the mean IoU; the checkpoint is picked
    on the validation mIoU."""
    what = name.replace("_", " ")
    return {
        "kind": SEGMENTATION,
        "headline": f"{name}_IoU",
        "higher_is_better": True,
        "key_metrics": (f"{name}_IoU", f"{name}_F1", "mIoU"),
        "definitions": {
            f"{name}_IoU": f"headline; IoU of the {what} class only (class {index}); ignored pixels (label -1) excluded",
            f"{name}_F1": f"F1 of the {what} class only = 2TP/(2TP+FP+FN) (not pixel accuracy)",
            f"{name}_precision": f"TP/(TP+FP) of the {what} class",
            f"{name}_recall": f"TP/(TP+FN) of the {what} class",
            "mIoU": "mean IoU over both classes",
            "pixel_accuracy": "correct / all labelled pixels (micro)",
        },
        "class_names": class_names,
        "positive_class": index,
        "positive_name": name,
        "selection_metric": "val/mIoU",
    }


@dataclass(frozen=True)
class FileFormat:
    """What every image or label file of a dataset is (checked file by file before training)."""

    reader: str  # "tif" (rasterio) or "h5" (h5py)
    bands: int
    dtype: str  # numpy dtype name, e.g. "int16"
    shape: tuple[int, int]  # height, width
    key: str = ""  # h5: the dataset inside the file
    channels_last: bool = False  # h5: height x width x bands
    georeferenced: bool = False  # tif: has a CRS and a pixel size, the same pixel size across the dataset
    same_crs: bool = True  # georeferenced: one CRS across the dataset (False: e.g. UTM zones per tile)
    unused_bands: tuple[int, ...] = ()  # 1-based bands the task does not read (placeholders): not checked
    nodata: float | None = None  # tif: the nodata value the file must declare (None: none)
    values: tuple[float, ...] | None = None  # labels: the only values allowed
    minimum: float | None = None  # labels: values below this are an error, except `values`


@dataclass(frozen=True)
class SplitFiles:
    """One official split of a dataset as it sits on disk: paired images and labels, and the
    chip ids its list file names (None when the split has no list file)."""

    images: list[Path]
    labels: list[Path]
    list_file: Path | None = None
    listed: list[str] | None = None

    @property
    def all(self) -> list[Path]:
        return self.images + self.labels + ([self.list_file] if self.list_file else [])


@dataclass(frozen=True)
class Task:
    """A downstream task. Subclasses set the fields and override the hooks below."""

    name: str
    title: str  # one line, shown in the schema, summary and report
    kind: str  # SEGMENTATION or REGRESSION
    headline: str  # pinned metric that ranks models
    higher_is_better: bool
    key_metrics: tuple[str, ...]  # the three metrics a summary row shows, headline first
    definitions: dict[str, str]  # pinned metric -> exact definition (written into every output)
    selection_split: str  # default labels of the two splits (what the bundled recipe does)
    test_split: str
    dataset: str = ""  # where the real dataset comes from (README, report)
    holdout: bool = False  # no usable validation split upstream: select on a hold-out of training
    class_names: tuple[str, ...] = ()
    positive_class: int | None = None  # binary segmentation: the class whose IoU/F1 are reported
    positive_name: str = ""  # metric prefix of that class, e.g. "landslide" -> landslide_IoU
    value_bins: tuple[float, ...] = ()  # regression: RMSE is also reported per true-value range
    units: str = ""
    selection_metric: str = ""  # the metric the bundled recipe's checkpoint callback monitors
    selection_mode: str = "max"  # whether a higher or lower selection_metric is better
    image_suffix: str = ""  # what follows the chip name in an image file's name
    rgb_bands: tuple[int, ...] = ()  # 1-based red, green, blue bands of a single-date GeoTIFF image
    image_format: FileFormat | None = None
    label_format: FileFormat | None = None
    split_labels: dict[str, str] = field(default_factory=dict)  # official split -> its label
    default_enabled: bool = True  # on in an experiment that does not mention the task
    sample_counts: dict[str, int] = field(default_factory=dict)  # chips per split of the sample data
    sample_stream: int | None = None  # random stream of the sample data (default: from the name)

    # ------------------------------------------------------------------ files and splits
    @property
    def recipe(self) -> Path:
        """The bundled TerraTorch LightningCLI recipe."""
        return REPO_ROOT / "config" / "tasks" / f"{self.name}.yaml"

    def check_layout(self, root: Path) -> str | None:
        """Why `root` is not this dataset's on-disk layout ('<problem>; fix: <what>'), or None."""
        raise NotImplementedError

    def files(self, root: Path) -> dict[str, SplitFiles]:
        """The dataset's files per official split, images paired with their labels."""
        raise NotImplementedError

    def split_files(self, root: Path) -> dict[str, list[Path]]:
        """Every file of the dataset, per official split (for the dataset manifest)."""
        return {split: files.all for split, files in self.files(root).items()}

    def split_label(self, split: str) -> str:
        """How an official split is named in every output."""
        return self.split_labels.get(split, f"official {split} split")

    def training_ids(self, root: Path) -> list[str]:
        """Chip ids of the official training split (holdout tasks: carved into train/select)."""
        raise NotImplementedError

    def test_ids(self, root: Path) -> list[str]:
        """Chip ids of the split a holdout task reports on."""
        raise NotImplementedError

    def holdout_split(self, root: Path) -> dict[str, list[str]]:
        """train / select / test chip ids of a holdout task (see `holdout_split` below)."""
        return holdout_split(self.training_ids(root), self.test_ids(root))

    def labels(self, root: Path, split: str, splits_dir: Path | None = None) -> Iterator[np.ndarray]:
        """Label maps of 'train' or 'test' as TerraTorch sees them (ignored pixels = -1); used
        for the trivial baseline, not for training."""
        raise NotImplementedError

    # ------------------------------------------------------------------ drawing
    def rgb_panels(self, image_path: Path) -> list[tuple[str, np.ndarray]]:
        """RGB composites of a raw chip, (title, HxWx3 in [0, 1]) per panel; by default the
        `rgb_bands` of a single-date GeoTIFF."""
        import rasterio

        with rasterio.open(image_path) as f:
            return [("RGB", stretch(f.read(list(self.rgb_bands)).transpose(1, 2, 0)))]

    def chip_name(self, image_path: str | Path) -> str:
        """A chip's short name (file name without the image suffix)."""
        name = Path(image_path).name
        for suffix in (self.image_suffix, ".tif", ".h5"):
            if suffix and name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    # ------------------------------------------------------------------ sample data
    def write_sample(
        self, root: Path, rng: np.random.Generator, counts: dict[str, int], compressed: bool = True
    ) -> None:
        """Write a small synthetic dataset in the real on-disk layout into the empty folder `root`
        (`compressed`: deflate/gzip inside the files, transparent to every reader)."""
        raise NotImplementedError

    @property
    def stream(self) -> int:
        return self.sample_stream if self.sample_stream is not None else zlib.crc32(self.name.encode())

    # ------------------------------------------------------------------ metrics
    def extra_metrics(self, iou, f1, precision, recall) -> dict[str, float]:
        """Metrics beyond the generic ones, from per-class scores (tensors over classes)."""
        if self.positive_class is None:
            return {}
        c, p = self.positive_class, self.positive_name
        return {
            f"{p}_IoU": iou[c].item(),
            f"{p}_F1": f1[c].item(),
            f"{p}_precision": precision[c].item(),
            f"{p}_recall": recall[c].item(),
        }

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


# ---------------------------------------------------------------------- shared helpers
def need_dir(root: Path, *rels: str) -> str | None:
    """The first of the folders `rels` that is missing under root, as a problem line."""
    for rel in rels:
        if not (root / rel).is_dir():
            return f"missing folder {root / rel}; fix: point data_root at the dataset's top folder"
    return None


def pairs_problem(images: list[Path], labels: list[Path], img_suffix: str, lbl_suffix: str, where: Path) -> str | None:
    """Every image has its label and every label its image (names differ only by suffix)."""
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


def read_ids(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def split_ids_problem(ids: list[str], chip_ids: list[str], split_file: Path) -> str | None:
    """A split file names existing chips, and none is a prefix of another (TerraTorch matches
    split ids as substrings: 'chip_1' would also select 'chip_10')."""
    if not ids:
        return f"{split_file} lists no chips; fix: list one chip id per line"
    known = set(chip_ids)
    for chip in ids:
        if chip not in known:
            return f"{split_file} names chip {chip!r} which does not exist; fix: remove it or add the chip"
    ordered = sorted(chip_ids)
    for chip in ids:
        i = bisect.bisect_right(ordered, chip)
        if i < len(ordered) and ordered[i].startswith(chip):
            return (
                f"{split_file}: id {chip!r} is a prefix of chip {ordered[i]!r} and TerraTorch "
                "would load both; fix: use ids that are not prefixes of one another"
            )
    return None


def holdout_split(train_ids: list[str], test_ids: list[str]) -> dict[str, list[str]]:
    """Deterministic hold-out of the training chips, by a hash of the chip id.

    Hashing (not position) keeps a chip on the same side when chips are added or removed.
    """

    def held_out(chip: str) -> bool:
        return int(hashlib.sha256(chip.encode()).hexdigest(), 16) % 100 < HOLDOUT_PERCENT

    select = [c for c in train_ids if held_out(c)]
    if not select:  # tiny datasets: still hold out at least one chip
        select = train_ids[-1:]
    chosen = set(select)
    return {"train": [c for c in train_ids if c not in chosen], "select": select, "test": list(test_ids)}


def write_split_lists(splits: dict[str, list[str]], folder: Path) -> None:
    """One `<name>.txt` per split, a chip id per line (TerraTorch's split-file format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (folder / f"{name}.txt").write_text("".join(f"{chip}\n" for chip in ids))


def stretch(rgb: np.ndarray) -> np.ndarray:
    """2-98 percentile stretch per band, to [0, 1]."""
    rgb = rgb.astype(np.float32)
    out = np.empty_like(rgb)
    for b in range(3):
        lo, hi = np.nanpercentile(rgb[..., b], [2, 98])
        out[..., b] = np.clip((rgb[..., b] - lo) / (hi - lo if hi > lo else 1), 0, 1)
    return out


def read_tif_label(path: Path, zero_is_nodata: bool = False) -> np.ndarray:
    """A label raster as float32 with ignored pixels -1 (nodata, or 0 where 0 means 'no data',
    in which case classes 1..N become 0..N-1)."""
    import rasterio

    with rasterio.open(path) as f:
        data = f.read(1, masked=True)
    label = data.filled(0 if zero_is_nodata else -1).astype(np.float32)
    return label - 1 if zero_is_nodata else label


def blobs(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Voronoi regions: index of the nearest of n random centres for every pixel."""
    centres = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return d.argmin(0)


def smooth_field(rng: np.random.Generator, size: int, scale: int = 32) -> np.ndarray:
    """A smooth random field in [0, 1] (bilinear upsampling of coarse noise)."""
    coarse = rng.uniform(0, 1, (size // scale + 2, size // scale + 2))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def gtiff(compressed: bool = True, **profile) -> dict:
    """A tiled GeoTIFF profile; deflate-compressed (transparent to rasterio) keeps the sample data
    small, uncompressed is what most published chips are (benchmarks use it)."""
    codec = {"compress": "deflate"} if compressed else {}
    return {"driver": "GTiff", "tiled": True, "blockxsize": 112, "blockysize": 112, **codec, **profile}


def write_tif(path: Path, array: np.ndarray, profile: dict, **options) -> None:
    """One GeoTIFF of the sample data: bands x height x width, its profile (gtiff()) and dtype/nodata."""
    import rasterio

    with rasterio.open(path, "w", count=array.shape[0], dtype=str(array.dtype), **profile, **options) as f:
        f.write(array)


def h5_options(compressed: bool = True) -> dict:
    """h5py create_dataset options of the sample data (gzip, or none as in the published files)."""
    return {"compression": "gzip"} if compressed else {}
