"""Check every file of a dataset against its task's declared format, in the pass that hashes it.

`validate(task, root)` reads each file once: the bytes are hashed for the dataset manifest and
decoded from memory for the checks (threads overlap the two; hashing and decoding release the
GIL). What is checked, per the task's `FileFormat`s (geofm/tasks/<task>.py):

- the file opens (empty, truncated or foreign files are named as such);
- band count, dtype and spatial shape; for GeoTIFFs the declared nodata value, a CRS and pixel
  size, the same within the dataset where the format says so, and a label on its image's grid;
- label values within the task's range;
- image bands that are all NaN or all one value, and NaN pixels (warnings);
- the split list files against the files present, both ways (listed but missing: error;
  present but listed nowhere: warning).

Problems are one line each: `<task>: <file>: <check> (expected ..., found ...); fix: ...`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geofm import geotiff
from geofm.tasks import TASKS
from geofm.tasks.base import FileFormat

SHOWN = 20  # problems listed in an error message; the rest are counted
CHECKS = [
    "opens (not empty, not truncated, right container)",
    "band count, dtype, height x width",
    "declared nodata value (GeoTIFF)",
    "CRS and pixel size present, the same within the dataset where the format says so (GeoTIFF)",
    "label on its image's grid (GeoTIFF)",
    "label values within the task's range",
    "image bands all NaN or all one value, NaN pixels (warnings)",
    "split lists against the files present, both ways",
]


class DataError(RuntimeError):
    """A dataset has files that do not match its task's format (listed in the message)."""


@dataclass
class Report:
    task: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: int = 0

    def add(self, path: str, check: str, fix: str, *, warning: bool = False) -> None:
        line = f"{self.task}: {path}: {check}; fix: {fix}"
        (self.warnings if warning else self.errors).append(line)

    def as_dict(self) -> dict:
        return {"checked_files": self.checked, "checks": CHECKS, "errors": self.errors, "warnings": self.warnings}

    def raise_if_errors(self) -> None:
        if not self.errors:
            return
        shown = self.errors[:SHOWN]
        rest = len(self.errors) - len(shown)
        more = f"\n... and {rest} more errors (all in the dataset manifest)" if rest else ""
        head = self.errors[0] + (
            f" (+{len(self.errors) - 1} more problems, listed below)" if len(self.errors) > 1 else ""
        )
        raise DataError(head + "\n" + "\n".join(shown) + more)


def _bytes(n: int) -> str:
    return f"{n:,}"


def _open_problem(kind: str, data: bytes, error: Exception) -> str:
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    m = re.search(r"eof = (\d+).*stored_eof = (\d+)", said)
    if m:
        return f"truncated HDF5 file ({_bytes(int(m[1]))} of {_bytes(int(m[2]))} bytes)"
    if isinstance(error, geotiff.Truncated):
        return f"truncated GeoTIFF ({said})"
    if not data:
        return "empty file (0 bytes)"
    return f"does not open as {kind} ({said[:160]})"


def _dtype_ok(fmt: FileFormat, dtype: np.dtype) -> bool:
    kinds = {"float": "f", "int": "i", "uint": "u"}
    return dtype.kind == kinds[fmt.dtype] if fmt.dtype in kinds else dtype == np.dtype(fmt.dtype)


def _read(fmt: FileFormat, data: bytes) -> tuple[np.ndarray, dict]:
    """(bands x height x width array, georeferencing facts) decoded from the file's bytes."""
    if fmt.reader == "h5":
        import h5py

        with h5py.File(io.BytesIO(data), "r") as f:
            if fmt.key not in f:
                raise KeyError(f"no dataset {fmt.key!r} (found {', '.join(f.keys()) or 'none'})")
            array = np.asarray(f[fmt.key])
        if array.ndim == 2:
            array = array[None]
        elif fmt.channels_last:
            array = np.moveaxis(array, -1, 0)
        return array, {}
    fast = geotiff.read(data)  # plain uncompressed GeoTIFFs: no GDAL
    if fast is not None:
        return fast
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memory, memory.open(driver="GTiff") as f:
        geo = {
            "crs": f.crs.to_string() if f.crs else None,
            "res": tuple(round(r, 9) for r in f.res),
            "transform": tuple(round(v, 6) for v in f.transform[:6]),
            "nodata": f.nodata,
        }
        return f.read(), geo


def _check_array(report: Report, rel: str, fmt: FileFormat, array: np.ndarray, geo: dict, is_label: bool) -> None:
    if array.shape[0] != fmt.bands:
        report.add(rel, f"band count (expected {fmt.bands}, found {array.shape[0]})", "re-download it")
    if not _dtype_ok(fmt, array.dtype):
        report.add(rel, f"dtype (expected {fmt.dtype}, found {array.dtype})", "re-download it")
    if tuple(array.shape[1:]) != tuple(fmt.shape):
        found = "x".join(map(str, array.shape[1:]))
        report.add(rel, f"height x width (expected {fmt.shape[0]}x{fmt.shape[1]}, found {found})", "re-download it")
    if fmt.reader == "tif":
        nodata = geo.get("nodata")
        if fmt.nodata is not None and (nodata is None or float(nodata) != float(fmt.nodata)):
            report.add(rel, f"nodata value (expected {fmt.nodata:g}, found {nodata})", "re-download it")
        if fmt.georeferenced and not geo.get("crs"):
            report.add(rel, "CRS (expected one, found none)", "re-download it")
    if is_label:
        _check_labels(report, rel, fmt, array)
    else:
        _check_bands(report, rel, array, fmt.unused_bands)


def _check_labels(report: Report, rel: str, fmt: FileFormat, values: np.ndarray) -> None:
    if values.dtype.kind == "f" and np.isnan(values.min()):
        report.add(rel, f"label NaN ({int(np.isnan(values).sum())} pixels)", "re-download it")
        values = values[~np.isnan(values)]
    found = np.unique(values)  # a label map holds few distinct values: check those, not every pixel
    allowed = np.asarray(fmt.values if fmt.values is not None else [], dtype=np.float64)
    if fmt.minimum is not None:
        bad = found[(found < fmt.minimum) & ~np.isin(found, allowed)]
        expected = f">= {fmt.minimum:g}" + (f" or {', '.join(f'{v:g}' for v in allowed)}" if len(allowed) else "")
    elif fmt.values is not None:
        bad = found[~np.isin(found, allowed)]
        expected = _range_text(allowed)
    else:
        return
    if bad.size:
        pixels = int(np.isin(values, bad).sum())
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        report.add(rel, f"label values (expected {expected}, found {shown}: {pixels:,} pixels)", "re-download it")


def _range_text(values: np.ndarray) -> str:
    ints = values.astype(int)
    if len(ints) > 2 and ints[0] >= 0 and np.array_equal(ints, np.arange(ints[0], ints[0] + len(ints))):
        return f"{ints[0]}-{ints[-1]}"
    return "/".join(f"{v:g}" for v in values)


def _check_bands(report: Report, rel: str, values: np.ndarray, unused: tuple[int, ...]) -> None:
    lows, highs = values.min(axis=(1, 2)), values.max(axis=(1, 2))  # NaN shows in both
    for band, (low, high) in enumerate(zip(lows, highs), start=1):
        if band in unused:
            continue
        if values.dtype.kind == "f" and np.isnan(low):
            plane = values[band - 1]
            nan = np.isnan(plane)
            if nan.all():
                report.add(rel, f"band {band} is all NaN", "check the download; the band carries no data", warning=True)
                continue
            report.add(rel, f"band {band} has {int(nan.sum()):,} NaN pixels", "check the download", warning=True)
            low, high = np.nanmin(plane), np.nanmax(plane)
        if low == high:
            report.add(rel, f"band {band} is one value ({low:g}) everywhere", "check the download", warning=True)


def _inspect(task: str, root: Path, path: Path, fmt: FileFormat, is_label: bool) -> dict:
    """One file: read once, hashed and checked; the result feeds the manifest and the report."""
    rel = str(path.relative_to(root))
    out = {"path": rel, "bytes": None, "sha256": None, "geo": None, "problems": Report(task)}
    try:
        data = path.read_bytes()
    except OSError as e:
        out["problems"].add(rel, f"cannot be read ({e.strerror or e})", "check the file's permissions")
        return out
    out["bytes"], out["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    kind = "HDF5" if fmt.reader == "h5" else "GeoTIFF"
    try:
        array, geo = _read(fmt, data)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a finding about this file
        out["problems"].add(rel, _open_problem(kind, data, e), "re-download it")
        return out
    out["geo"] = geo
    _check_array(out["problems"], rel, fmt, array, geo, is_label)
    return out


def _hash_only(root: Path, path: Path) -> dict:
    data = path.read_bytes()
    return {"path": str(path.relative_to(root)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def validate(task_name: str, root: Path, threads: int | None = None) -> tuple[dict, Report]:
    """(dataset manifest, report of problems) for one task's dataset at `root`."""
    from geofm.manifest import sha256_json

    task, root = TASKS[task_name], Path(root)
    report = Report(task_name)
    official = task.files(root)
    jobs = []  # (split, path, format, image it belongs to: None for an image)
    for split, files in official.items():
        jobs += [(split, p, task.image_format, None) for p in files.images]
        jobs += [(split, lbl, task.label_format, img) for img, lbl in zip(files.images, files.labels)]
    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 2))) as pool:
        inspected = list(
            pool.map(lambda j: (j[0], j[3], _inspect(task_name, root, j[1], j[2], j[3] is not None)), jobs)
        )
        lists = [(s, f.list_file) for s, f in official.items() if f.list_file and f.list_file.is_file()]
        hashed_lists = list(pool.map(lambda s_f: (s_f[0], _hash_only(root, s_f[1])), lists))
    report.checked = len(inspected) + len(hashed_lists)
    for _, _, result in inspected:
        report.errors += result["problems"].errors
        report.warnings += result["problems"].warnings
    _consistency(report, task, root, inspected)
    _check_lists(report, root, task, official)
    splits = {}
    for split in official:
        entries = [{k: r[k] for k in ("path", "bytes", "sha256")} for s, _, r in inspected if s == split]
        entries += [e for s, e in hashed_lists if s == split]
        splits[split] = {
            "files": len(entries),
            "bytes": sum(e["bytes"] or 0 for e in entries),
            "sha256": sha256_json(entries),
            "entries": entries,
        }
    document = {"task": task_name, "sha256": sha256_json({s: v["sha256"] for s, v in splits.items()}), "splits": splits}
    document["validation"] = report.as_dict()
    return document, report


def _consistency(report: Report, task, root: Path, inspected: list) -> None:
    """The same CRS and pixel size across the dataset, and each label on its image's grid."""
    fmt = task.image_format
    if fmt.reader != "tif":
        return
    geo_of = {r["path"]: r["geo"] for _, _, r in inspected if r["geo"]}
    first = None
    for _, image, result in inspected:
        geo = result["geo"]
        if image is not None or not geo or not geo.get("crs") or not fmt.georeferenced:
            continue
        first = first or (result["path"], geo)
        if fmt.same_crs and geo["crs"] != first[1]["crs"]:
            found = f"expected {first[1]['crs']} as in {first[0]}, found {geo['crs']}"
            report.add(result["path"], f"CRS ({found})", "re-download it; this dataset is in one CRS")
        if geo["res"] != first[1]["res"]:
            found = f"expected {first[1]['res']} as in {first[0]}, found {geo['res']}"
            report.add(result["path"], f"pixel size ({found})", "re-download it")
    for _, image, result in inspected:
        label_geo, image_geo = result["geo"], geo_of.get(str(image.relative_to(root))) if image else None
        if (
            label_geo
            and image_geo
            and (label_geo["transform"], label_geo["crs"]) != (image_geo["transform"], image_geo["crs"])
        ):
            report.add(result["path"], "grid (expected its image's CRS and transform, found others)", "re-download it")


def _check_lists(report: Report, root: Path, task, official: dict) -> None:
    for files in official.values():
        if files.list_file is None:
            continue
        rel = str(files.list_file.relative_to(root))
        if not files.list_file.is_file():
            report.add(rel, "split list (expected the file, found none)", "download it beside the chips")
            continue
        present = {task.chip_name(p) for p in files.images}
        listed = list(files.listed or [])
        for chip in [c for c in listed if c not in present]:
            report.add(rel, f"names chip {chip}, whose image is missing", "re-download the chip or remove the line")
        for chip in sorted(present - set(listed)):
            report.add(rel, f"lists no chip {chip}, which is present", "add it or remove the chip", warning=True)
