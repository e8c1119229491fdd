"""Which chips selected the checkpoint and which were reported, measured, never assumed.

After `setup()`, a TerraTorch datamodule's validation dataset is what the checkpoint callback
scores and its test dataset is what the reported metrics come from. `measure()` reads the image
files each holds, labels each set from the task's official splits (or says what it is when it
is none of them), and counts the chips the two share. `check()` refuses a leak: a chip read for
checkpoint selection that is also read for the reported metrics, unless the task's config opts
in (`allow_selection_on_reported_split`), in which case every output marks the cell LEAKY.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from geofm.tasks import TASKS
from geofm.tasks.base import HOLDOUT_SPLIT

LEAKY = "LEAKY"
OPT_IN = "allow_selection_on_reported_split"
FILE_LISTS = ("image_files", "files", "filenames", "samples")


class SplitLeak(RuntimeError):
    """The checkpoint would be selected on chips that are also reported."""


def dataset_files(dataset) -> list[str] | None:
    """The image files a dataset reads (through Subset / ConcatDataset); None if it lists none."""
    if dataset is None:
        return None
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(dataset, "indices"):  # torch Subset
        files = dataset_files(inner)
        return None if files is None else [files[i] for i in dataset.indices]
    if hasattr(dataset, "datasets"):  # torch ConcatDataset
        parts = [dataset_files(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [f for p in parts for f in p]
    for name in FILE_LISTS:
        files = getattr(dataset, name, None)
        if isinstance(files, list | tuple) and all(isinstance(f, str | os.PathLike) for f in files):
            return [str(f) for f in files]
    return None


def _resolved(files: list[str]) -> list[str]:
    return sorted({os.path.realpath(f) for f in files})


def _describe(files: list[str], data_root: Path) -> dict:
    """Count and content-free fingerprint of a file set (names relative to the data root)."""
    root = os.path.realpath(data_root)
    names = [os.path.relpath(f, root) if f.startswith(root + os.sep) else f for f in files]
    return {"chips": len(files), "sha256": hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()}


def label(task_name: str, files: list[str] | None, data_root: Path, splits_dir: Path | None) -> str:
    """The name of a file set: an official split, the hold-out of a holdout task, or a
    description of what it is (count and folders) when it is neither."""
    if files is None:
        return "unknown (the datamodule's dataset lists no files)"
    task = TASKS[task_name]
    chosen = set(_resolved(files))
    official = task.files(Path(data_root)) if Path(data_root).is_dir() else {}
    for split, split_files in official.items():
        if chosen and chosen == set(_resolved([str(p) for p in split_files.images])):
            return task.split_label(split)
    if task.holdout and splits_dir is not None and (Path(splits_dir) / "select.txt").is_file():
        held = set((Path(splits_dir) / "select.txt").read_text().split())
        select = {os.path.realpath(p) for f in official.values() for p in f.images if task.chip_name(p) in held}
        if chosen and chosen == select:
            return HOLDOUT_SPLIT
    folders = sorted({os.path.relpath(os.path.dirname(f), os.path.realpath(data_root)) for f in chosen})
    shown = ", ".join(folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
    return f"custom: {len(chosen)} chips from {shown}"


def measure(datamodule, task_name: str, data_root: Path, splits_dir: Path | None) -> dict:
    """Set the datamodule up and describe its selection (validation) and reported (test) sets."""
    datamodule.setup("fit")
    datamodule.setup("test")
    sets = {
        "train": dataset_files(getattr(datamodule, "train_dataset", None)),
        "selection": dataset_files(getattr(datamodule, "val_dataset", None)),
        "test": dataset_files(getattr(datamodule, "test_dataset", None)),
    }
    facts: dict = {}
    for name, files in sets.items():
        facts[name] = {"label": label(task_name, files, data_root, splits_dir)}
        facts[name].update(_describe(files, data_root) if files is not None else {"chips": None, "sha256": None})
    known = sets["selection"] is not None and sets["test"] is not None
    facts["shared_selection_test"] = (
        len(set(_resolved(sets["selection"])) & set(_resolved(sets["test"]))) if known else None
    )
    return facts


def leak_keys(config: dict) -> tuple[str, str]:
    """The rendered config's keys that choose the validation and the test files."""
    init = ((config.get("data") or {}).get("init_args")) or {}
    for suffix in ("split", "data_root"):
        val, test = f"val_{suffix}", f"test_{suffix}"
        if init.get(val) is not None or init.get(test) is not None:
            return f"data.init_args.{val}", f"data.init_args.{test}"
    return "data.init_args.data_root (validation)", "data.init_args.data_root (test)"


def check(facts: dict, config: dict, task_name: str, allowed: bool) -> dict:
    """Refuse a leak (SplitLeak, one line), or mark it when the task's config allows it."""
    shared = facts.get("shared_selection_test")
    facts["leaky"] = bool(shared)
    if shared and not allowed:
        val, test = leak_keys(config)
        raise SplitLeak(
            f"tasks.{task_name}: the checkpoint would be selected on {shared} of the "
            f"{facts['test']['chips']} chips that are reported ({val} and {test} read the same chips); "
            f"fix: validate on a hold-out split file or another split, or set tasks.{task_name}.{OPT_IN}: true"
        )
    if shared:
        facts["selection"]["label"] = f"{LEAKY}: {facts['selection']['label']}"
    return facts
