"""geofm.loading: staged samples and batches are bit-identical to what TerraTorch's own datasets
yield (augmentations seeded alike), staging is keyed by content, and the worker set-up limits
threads. Sample data in each dataset's real on-disk format, through each task's real recipe."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from geofm import loading, render, sample_data
from geofm.config import cell_settings, resolve
from geofm.manifest import sha256_file
from geofm.tasks import TASKS
from geofm.tasks.base import write_split_lists

REPO = Path(__file__).resolve().parent.parent
COUNTS = {
    "crop": {"training": 6, "validation": 3},
    "landslide": {"train": 5, "validation": 2, "test": 3},
    "biomass": {"train": 5, "val": 2, "test": 3},
}


def _seed(dataset, seed: int) -> None:
    import albumentations

    transform = getattr(dataset, "transform", None)
    if isinstance(transform, albumentations.BaseCompose):
        transform.set_random_seed(seed)


@pytest.fixture(scope="module")
def datamodules(tmp_path_factory):
    """Each task's TerraTorch datamodule, built from its rendered recipe as `terratorch fit` would."""
    os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from terratorch.cli_tools import build_lightning_cli

    work = tmp_path_factory.mktemp("loading")
    experiment = resolve(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), root=REPO)
    out = {}
    for task, counts in COUNTS.items():
        data = work / task
        sample_data.write(task, data, seed=1, counts=counts)
        splits = work / f"{task}-splits"
        splits.mkdir()
        if TASKS[task].holdout:
            write_split_lists(TASKS[task].holdout_split(data), splits)
        experiment["tasks"][task]["data_root"] = str(data)
        paths = {"data_root": str(data), "run_dir": str(work / "run"), "splits_dir": str(splits), "ckpt_path": None}
        recipe = Path(experiment["tasks"][task]["recipe"]).read_text()
        config = work / f"{task}.yaml"
        config.write_text(yaml.safe_dump(render.render(recipe, cell_settings(experiment, task, "tiny", 0), paths)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = build_lightning_cli(args=["--config", str(config)], run=False)
        cli.datamodule.setup("fit")
        cli.datamodule.setup("test")
        out[task] = (cli.datamodule, data)
    return out


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("task", list(COUNTS))
def test_staged_samples_and_batches_are_bit_identical(datamodules, task, tmp_path):
    dm, _ = datamodules[task]
    for split in ("train", "val", "test"):
        original = getattr(dm, f"{split}_dataset")
        staged = loading.staged(original, tmp_path / "staging")
        assert isinstance(staged, loading.StagedDataset), f"{task} {split} was not staged"
        for seed in (0, 1):  # training augmentations (flips) drawn alike from the same seed
            _seed(original, seed)
            want = [original[i] for i in range(len(original))]
            _seed(original, seed)
            got = [staged[i] for i in range(len(staged))]
            assert all(_equal(a, b) for a, b in zip(want, got)), f"{task} {split}: a staged sample differs"
        loader = getattr(dm, f"{split}_dataloader")()  # the datamodule's own collate and batch size
        _seed(original, 7)
        want = list(torch.utils.data.DataLoader(original, batch_size=2, collate_fn=loader.collate_fn))
        _seed(original, 7)
        got = list(torch.utils.data.DataLoader(staged, batch_size=2, collate_fn=loader.collate_fn))
        assert len(want) == len(got) and all(_equal(a, b) for a, b in zip(want, got)), f"{task} {split}: batch"
        if split == "test":  # no augmentation: the same batches from worker processes
            workers = loading.make_loader(
                loader,
                {"num_workers": 2, "pin_memory": False, "persistent_workers": False, "prefetch_factor": 2},
                dataset=staged,
                worker_init_fn=loading.WorkerInit(),
            )
            direct = list(
                torch.utils.data.DataLoader(original, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
            )
            assert all(_equal(a, b) for a, b in zip(direct, workers)), f"{task}: batch from workers"


def test_staging_is_keyed_by_content_and_reused(datamodules, tmp_path):
    dm, data = datamodules["landslide"]
    ds = dm.test_dataset
    first = loading.stage(ds, tmp_path / "cache")
    stamp = (first / "image.npy").stat().st_mtime_ns
    assert loading.stage(ds, tmp_path / "cache") == first and (first / "image.npy").stat().st_mtime_ns == stamp
    # moved data, same content: same key; one changed file: a new key
    from terratorch.datasets import Landslide4SenseNonGeo

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    again = Landslide4SenseNonGeo(str(moved), split="test", bands=ds.bands, transform=ds.transform)
    assert loading.stage_key(again) == first.name
    import h5py

    with h5py.File(moved / "images" / "test" / Path(ds.image_files[0]).name, "r+") as f:
        f["img"][0, 0, 0] += 1
    assert loading.stage_key(again) != first.name
    # manifest hashes key the same without reading the files again
    hashes = {str(Path(p).resolve()): sha256_file(Path(p)) for p in loading._files(ds)}
    assert loading.stage_key(ds, hashes=hashes) == first.name
    # another band selection decodes differently: another key
    other = Landslide4SenseNonGeo(str(data), split="test", bands=["RED", "GREEN"], transform=ds.transform)
    assert loading.stage_key(other) != first.name


def _stage_into(ds, cache, queue):
    queue.put(str(loading.stage(ds, cache, workers=0)))


def test_concurrent_jobs_stage_once(datamodules, tmp_path):
    import multiprocessing

    ds = datamodules["landslide"][0].val_dataset
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    jobs = [ctx.Process(target=_stage_into, args=(ds, tmp_path, queue)) for _ in range(2)]
    for job in jobs:
        job.start()
    folders = {queue.get(timeout=60) for _ in jobs}
    for job in jobs:
        job.join(60)
    assert len(folders) == 1 and all(job.exitcode == 0 for job in jobs)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [Path(*folders).name]


def test_staging_leaves_the_random_generators_as_they_were(datamodules, tmp_path):
    """A re-run finds the split staged and decodes nothing: the run must not depend on that."""
    import random

    ds = datamodules["biomass"][0].val_dataset
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    loading.staged(ds, tmp_path / "fresh", workers=1)  # decodes in a worker: draws a base seed
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_unsupported_dataset_is_served_unstaged(tmp_path):
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.zeros(1)}

    ds = Plain()
    with pytest.warns(UserWarning, match="staging skipped"):
        assert loading.staged(ds, tmp_path) is ds
    assert loading.staged(ds, None) is ds


def test_compact_storage_is_exact():
    assert loading._exact_dtype(np.array([0, 3, 10000], np.float32)) == np.uint16
    assert loading._exact_dtype(np.array([-1, 12], np.float32)) == np.int8
    assert loading._exact_dtype(np.array([0.5, 1], np.float32)) == np.float32
    assert loading._exact_dtype(np.array([-0.0, 1], np.float32)) == np.float32  # -0.0 would come back as 0.0
    assert loading._exact_dtype(np.array([np.nan, 1], np.float32)) == np.float32
    assert not loading._fits(np.array([300], np.float32), np.dtype(np.uint8))


def test_usable_cpus_follow_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(loading, "_cgroup_cpu_limit", lambda: None)
    assert loading.usable_cpus() == 4
    monkeypatch.setattr(loading, "_cgroup_cpu_limit", lambda: 1.5)
    assert loading.usable_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert loading.usable_cpus() == 1
    settings = loading.loader_settings(threads=16, cuda=True)
    assert settings["num_workers"] == 1 and settings["cpus"] == 1  # one usable CPU, shared with training
    assert loading.loader_settings(threads=16, cuda=False)["num_workers"] == 0
    assert loading.loader_settings(threads=1, cuda=True, num_workers=0)["prefetch_factor"] is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(loading, "_cgroup_cpu_limit", lambda: None)
    settings = loading.loader_settings(threads=8, cuda=True)
    assert settings["num_workers"] == 7 and settings["persistent_workers"] and settings["pin_memory"]
    assert loading.loader_settings(threads=16, cuda=True)["num_workers"] == 8
    assert loading.loader_settings(threads=2, cuda=False)["num_workers"] == 0


def test_cgroup_quota_files(tmp_path):
    assert loading._cgroup_cpu_limit(str(tmp_path)) is None  # no cgroup files: no quota
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert loading._cgroup_cpu_limit(str(tmp_path)) == 2.5
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2 first
    assert loading._cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert loading._cgroup_cpu_limit(str(tmp_path)) is None


class _Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        import cv2
        from threadpoolctl import threadpool_info

        pools = {p["internal_api"]: p["num_threads"] for p in threadpool_info()}
        return {
            "torch": torch.get_num_threads(),
            "cv2": cv2.getNumThreads(),
            "pools": max(pools.values(), default=1),
            "gdal": os.environ.get("GDAL_NUM_THREADS"),
            "readdir": os.environ.get("GDAL_DISABLE_READDIR_ON_OPEN"),
            "chained": os.environ.get("GEOFM_TEST_CHAINED"),
        }


def _chained(worker_id: int) -> None:
    os.environ["GEOFM_TEST_CHAINED"] = str(worker_id)


def test_worker_init_limits_threads(tmp_path):
    (tmp_path / "a.tif").touch()
    env = loading.worker_env(1, [tmp_path])
    assert env["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    (tmp_path / "a.tif.aux.xml").touch()  # GDAL needs the folder listing to find sidecars
    assert "GDAL_DISABLE_READDIR_ON_OPEN" not in loading.worker_env(1, [tmp_path])
    loader = torch.utils.data.DataLoader(
        _Probe(), batch_size=None, num_workers=1, worker_init_fn=loading.WorkerInit(_chained, env=env)
    )
    (report,) = list(loader)
    assert report == {"torch": 1, "cv2": 1, "pools": 1, "gdal": "1", "readdir": "EMPTY_DIR", "chained": "0"}
