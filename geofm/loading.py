"""Data loading that scales: the CPUs a job may really use, per-worker thread and GDAL limits,
recommended DataLoader settings, and an opt-in staging step that serves a split from
memory-mapped arrays instead of decoding its files on every epoch.

Measured on the sample data (benchmarks/dataloader.py; numbers in the README's Performance
table): TerraTorch's datasets spend 30-60 ms of CPU per 224 px chip, about two thirds of it
outside decompression (rioxarray's open with CRS and coordinate handling, masked float
conversion, fillna). Staging pays that once per split; a staged sample costs a copy out of the
page cache plus the recipe's own transforms. On a host whose job may use fewer CPUs than the
machine has (a SLURM cpuset, a container quota), workers sized from os.cpu_count() fight over
those few CPUs: `usable_cpus()` sizes them from what the job may run on.

Used from geofm.training's loader set-up (`runtime_settings`, `_tune_loaders`); nothing here changes TerraTorch's classes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from geofm.manifest import sha256_file, sha256_json

STAGE_FORMAT = 1  # bump when the staged layout or what is staged changes
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "GDAL_NUM_THREADS")
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk")


# ---------------------------------------------------------------- CPUs and worker set-up
def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 cpu.max, or v1 cfs quota/period), if any."""
    candidates = [(f"{root}/cpu.max", None)]
    for v1 in (f"{root}/cpu", f"{root}/cpu,cpuacct"):
        candidates.append((f"{v1}/cpu.cfs_quota_us", f"{v1}/cpu.cfs_period_us"))
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = Path(quota_file).read_text().split()[:2]
            else:
                quota, period = Path(quota_file).read_text().strip(), Path(period_file).read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def usable_cpus() -> int:
    """The CPUs this process may really run on: the smaller of its CPU affinity (what a SLURM
    cpuset or `taskset` allows) and the cgroup CPU quota (a container limit), at least 1.

    os.cpu_count() counts the machine's CPUs: a job given 1 CPU of a 16-core node that sizes
    its loader from it starts 15 workers on one core."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cpu_report() -> dict:
    """What the job sees: for resource reports and the GPU check."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "os_cpu_count": os.cpu_count(),
        "affinity": affinity,
        "cgroup_quota_cpus": _cgroup_cpu_limit(),
        "usable_cpus": usable_cpus(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
    }


def _has_sidecars(folders: Sequence[Path]) -> bool:
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                if any(e.name.endswith(SIDECAR_SUFFIXES) for e in entries):
                    return True
        except OSError:
            return True  # unknown: keep GDAL's default
    return False


def worker_env(threads: int = 1, data_dirs: Sequence[Path | str] = ()) -> dict[str, str]:
    """Environment for a loader worker: one thread per native pool (the worker is the unit of
    parallelism), and, when the data folders hold no GDAL sidecar files (.aux.xml, .ovr, .msk),
    no directory listing on each open (GDAL lists a raster's folder to look for them: ~1.5 ms
    per open beside 8,000 files on a local disk, far more on a network file system)."""
    env = {name: str(threads) for name in THREAD_ENV}
    dirs = [Path(d) for d in data_dirs]
    if dirs and not _has_sidecars(dirs):
        env["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
    return env


def limit_threads(threads: int = 1) -> None:
    """Cap the native thread pools already loaded in this process (torch, OpenCV, OpenMP,
    BLAS); the environment variables only reach pools started later."""
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
        cv2.ocl.setUseOpenCL(False)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    except ImportError:
        pass


class WorkerInit:
    """A DataLoader `worker_init_fn` (picklable, so it also works with the spawn start method):
    applies `worker_env` and `limit_threads` in the worker, then calls the chained function."""

    def __init__(
        self, chained: Callable[[int], None] | None = None, env: Mapping[str, str] | None = None, threads: int = 1
    ):
        self.chained = chained
        self.env = dict(env if env is not None else worker_env(threads))
        self.threads = threads

    def __call__(self, worker_id: int) -> None:
        os.environ.update(self.env)
        try:  # GDAL reads most options when used; set them as config options too
            from rasterio.env import set_gdal_config

            for key, value in self.env.items():
                if key.startswith("GDAL_"):
                    set_gdal_config(key, value)
        except ImportError:
            pass
        limit_threads(self.threads)
        if self.chained is not None:
            self.chained(worker_id)


def loader_settings(threads: int, cuda: bool, num_workers: int | str = "auto", prefetch_factor: int = 2) -> dict:
    """Recommended DataLoader settings for a job given `threads` CPUs.

    'auto' workers come from the CPUs the job may really use (`usable_cpus`), never more than
    it was given. GPU: every such CPU but one (the training loop's), at least 1 (the training
    loop mostly waits on the GPU) and at most 8 (more only add memory: a staged split feeds a
    GPU from 1-2 workers, an unstaged 18-band chip costs ~60 ms of CPU). CPU: a training step
    costs ~10x loading its batch, so on 1-2 cores a worker only takes a core from training."""
    cpus = max(1, min(threads, usable_cpus()))
    if num_workers == "auto":
        if cuda:
            num_workers = min(8, max(1, cpus - 1))
        else:
            num_workers = min(4, cpus // 2) if cpus > 2 else 0
    num_workers = int(num_workers)
    return {
        "cpus": cpus,
        "num_workers": num_workers,
        "pin_memory": bool(cuda),
        "persistent_workers": num_workers > 0,
        "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        "torch_threads": max(1, cpus - num_workers),
    }


def make_loader(dl, rt: Mapping, dataset=None, worker_init_fn: Callable[[int], None] | None = None):
    """Re-create a datamodule's DataLoader `dl` (same sampler, batch size, collate, generator)
    with the job's loader settings `rt` (num_workers, pin_memory, persistent_workers,
    prefetch_factor; optional multiprocessing_context), optionally over another dataset (a
    StagedDataset of the same samples)."""
    from torch.utils.data import DataLoader

    workers = rt["num_workers"]
    return DataLoader(
        dl.dataset if dataset is None else dataset,
        batch_size=dl.batch_size,
        sampler=dl.sampler,
        num_workers=workers,
        collate_fn=dl.collate_fn,
        drop_last=dl.drop_last,
        pin_memory=rt["pin_memory"],
        persistent_workers=bool(rt["persistent_workers"] and workers > 0),
        prefetch_factor=rt["prefetch_factor"] if workers > 0 else None,
        worker_init_fn=worker_init_fn if workers > 0 else None,
        generator=dl.generator,
        multiprocessing_context=rt.get("multiprocessing_context") if workers > 0 else None,
    )


# ---------------------------------------------------------------- staging
class StagingUnsupported(Exception):
    """This dataset cannot be staged (unknown class, georeference output, ragged shapes)."""


def _exact_dtype(a: np.ndarray) -> np.dtype:
    """The smallest integer dtype that holds `a` bit-exactly after a cast back, else its own."""
    if a.dtype.kind != "f" or a.size == 0:
        return a.dtype
    if not np.isfinite(a).all():
        return a.dtype
    for candidate in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        info = np.iinfo(candidate)
        if a.min() >= info.min and a.max() <= info.max and _fits(a, np.dtype(candidate)):
            return np.dtype(candidate)
    return a.dtype


def _fits(a: np.ndarray, dtype: np.dtype) -> bool:
    """Whether `a` survives a cast to `dtype` and back bit for bit (-0.0, NaN and rounding fail)."""
    if a.dtype == dtype:
        return True
    with np.errstate(invalid="ignore", over="ignore"):
        back = a.astype(dtype).astype(a.dtype)
    return np.array_equal(back.view(f"u{a.itemsize}"), a.view(f"u{a.itemsize}"))


def _post_generic(cast: str | None):
    def post(ds, index: int, output: dict) -> dict:
        # GenericPixelWiseDataset.__getitem__ after its transform, then the subclass's cast
        output["filename"] = ds.image_files[index]
        if cast and "mask" in output:
            output["mask"] = getattr(output["mask"], cast)()
        return output

    return post


def _post_landslide(ds, index: int, output: dict) -> dict:
    output["mask"] = output["mask"].long()  # Landslide4SenseNonGeo.__getitem__ after its transform
    return output


# What each supported TerraTorch (1.2.11) dataset class does after its transform, and the
# attributes holding its files. tests/test_loading.py checks staged samples bit for bit
# against each class's own __getitem__, so a TerraTorch change that breaks this fails there.
_CLASSES = {
    "terratorch.datasets.generic_pixel_wise_dataset.GenericNonGeoSegmentationDataset": (
        _post_generic("long"),
        ("image_files", "segmentation_mask_files"),
    ),
    "terratorch.datasets.generic_pixel_wise_dataset.GenericNonGeoPixelwiseRegressionDataset": (
        _post_generic("float"),
        ("image_files", "segmentation_mask_files"),
    ),
    "terratorch.datasets.landslide4sense.Landslide4SenseNonGeo": (_post_landslide, ("image_files", "mask_files")),
}
_NOT_PARAMS = {"transform", "image_files", "segmentation_mask_files", "mask_files", "split_file", "data_directory"}


def _class_name(ds) -> str:
    return f"{type(ds).__module__}.{type(ds).__qualname__}"


def _check_supported(ds) -> None:
    if _class_name(ds) not in _CLASSES:
        raise StagingUnsupported(f"no staging support for {_class_name(ds)}")
    if getattr(ds, "tortilla_df", None) is not None or getattr(ds, "return_georeference", False):
        raise StagingUnsupported("tortilla input or georeference output")


def _files(ds) -> list[str]:
    return [str(p) for attr in _CLASSES[_class_name(ds)][1] for p in getattr(ds, attr, None) or []]


def _params(ds) -> dict:
    """The dataset's plain settings (bands, scaling, no-data and label handling ...) that shape
    what it decodes; paths, file lists and the transform excluded."""

    def plain(v):
        if isinstance(v, (bool, int, float, type(None))):
            return True
        if isinstance(v, str):
            return os.sep not in v
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return hasattr(v, "value") and plain(v.value)  # enums such as HLSBands

    return {
        k: str(v) for k, v in sorted(vars(ds).items()) if k not in _NOT_PARAMS and not k.startswith("_") and plain(v)
    }


class _Capture:
    """A stand-in transform that records what the dataset would hand its transform (the decoded
    sample: bands selected, reshaped, float, labels shifted) and returns it as tensors so that
    the dataset's own steps after the transform still run."""

    def __init__(self):
        self.sample: dict | None = None

    def __call__(self, **sample):
        self.sample = sample
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()}


def decode(ds, index: int) -> dict[str, np.ndarray]:
    """The sample that `ds` (a TerraTorch dataset) passes to its transform, from its own
    __getitem__: what staging stores."""
    capture, transform = _Capture(), ds.transform
    ds.transform = capture
    try:
        ds[index]
    finally:
        ds.transform = transform
    sample = capture.sample or {}
    if not sample or not all(isinstance(v, np.ndarray) for v in sample.values()):
        raise StagingUnsupported(f"sample {index} holds more than arrays: {sorted(sample)}")
    return sample


def hashes_from_manifest(manifest: Mapping | str | Path, root: str | Path) -> dict[str, str]:
    """{absolute path: sha256} from a dataset manifest (geofm.manifest.dataset_manifest), so
    staging need not read every file again to key the split."""
    if not isinstance(manifest, Mapping):
        manifest = json.loads(Path(manifest).read_text())
    root = Path(root)
    return {
        str((root / e["path"]).resolve()): e["sha256"]
        for split in manifest["splits"].values()
        for e in split["entries"]
    }


def stage_key(ds, hashes: Mapping[str, str] | None = None) -> str:
    """Content key of a dataset's split: every file's sha256 in the dataset's order (moved or
    renamed data keeps its staging), the class, its decode settings and the versions."""
    import terratorch

    _check_supported(ds)
    hashes = hashes or {}
    key = {
        "format": STAGE_FORMAT,
        "class": _class_name(ds),
        "terratorch": getattr(terratorch, "__version__", None),
        "numpy": np.__version__,
        "params": _params(ds),
        "files": [hashes.get(str(Path(p).resolve())) or sha256_file(Path(p)) for p in _files(ds)],
    }
    return sha256_json(key)


class _Decode(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        return index, decode(self.ds, index)


def _identity(x):
    return x


def _write(ds, folder: Path, workers: int) -> dict:
    """Decode every sample once (in `workers` processes) into one .npy file per key."""
    n = len(ds)
    if n == 0:
        raise StagingUnsupported("empty dataset")
    first = decode(ds, 0)
    layout = {
        role: {"shape": list(a.shape), "dtype": a.dtype.str, "stored": _exact_dtype(a).str} for role, a in first.items()
    }
    for _attempt in range(len(layout) + 1):  # each retry widens one role to its decoded dtype
        arrays = {
            role: np.lib.format.open_memmap(
                folder / f"{role}.npy", mode="w+", dtype=np.dtype(spec["stored"]), shape=(n, *spec["shape"])
            )
            for role, spec in layout.items()
        }
        loader = torch.utils.data.DataLoader(
            _Decode(ds),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            worker_init_fn=WorkerInit() if workers else None,
        )
        widened = False
        for index, sample in loader:
            if sorted(sample) != sorted(layout):
                raise StagingUnsupported(f"sample {index} holds {sorted(sample)}, the first {sorted(layout)}")
            for role, a in sample.items():
                spec = layout[role]
                if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
                    raise StagingUnsupported(
                        f"sample {index} {role}: {a.dtype}{list(a.shape)} differs from {spec['dtype']}{spec['shape']}"
                    )
                if not _fits(a, np.dtype(spec["stored"])):
                    spec["stored"] = spec["dtype"]  # keep the decoded dtype; write again
                    widened = True
                    break
                arrays[role][index] = a
            if widened:
                break
        for a in arrays.values():
            a.flush()
        del arrays
        if not widened:
            return layout
    raise StagingUnsupported("could not find a storage dtype")  # unreachable: the decoded dtype always fits


def _lock(path: Path):
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def stage(ds, cache_dir: str | Path, hashes: Mapping[str, str] | None = None, workers: int | None = None) -> Path:
    """Decode a TerraTorch dataset's split once into `cache_dir/<key>/` (one memory-mappable
    .npy per sample key plus meta.json), with `workers` processes (default: the usable CPUs);
    returns that folder. Idempotent and safe for concurrent jobs: the first builds under a lock
    into a temporary folder and renames it; the others wait and reuse it (on a shared file
    system without working locks, two hosts may both decode; the first rename wins). The key is
    the split's content hash (see `stage_key`)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = stage_key(ds, hashes)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        return final
    with _lock(cache_dir / f".{key}.lock"):
        if (final / "meta.json").is_file():
            return final
        tmp = cache_dir / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            layout = _write(ds, tmp, usable_cpus() if workers is None else workers)
            meta = {
                "format": STAGE_FORMAT,
                "key": key,
                "class": _class_name(ds),
                "samples": len(ds),
                "layout": layout,
                "params": _params(ds),
                "files": _files(ds),  # where it came from (informative: the key is the content)
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():  # not another host's finished copy
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


class StagedDataset(torch.utils.data.Dataset):
    """Serves a TerraTorch dataset's samples from its staged arrays: what TerraTorch's own
    __getitem__ returns, bit for bit, including its transforms (augmentations use the wrapped
    dataset's transform objects, so the workflow's seeding reaches them).

    Arrays are opened lazily in each process (workers map the same page-cache pages)."""

    def __init__(self, dataset, folder: str | Path):
        self.dataset = dataset
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta["samples"] != len(dataset):
            raise StagingUnsupported(f"{self.folder} holds {self.meta['samples']} samples, the dataset {len(dataset)}")
        self._arrays: dict[str, np.ndarray] | None = None
        self._post = _CLASSES[_class_name(dataset)][0]

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, role: str, index: int) -> np.ndarray:
        # always a fresh, writable, plain ndarray (TerraTorch changes some in place)
        return np.array(self._arrays[role][index], dtype=np.dtype(self.meta["layout"][role]["dtype"]), copy=True)

    def __getitem__(self, index: int) -> dict:
        if self._arrays is None:
            self._arrays = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in self.meta["layout"]}
        sample = {k: self._fetch(k, index) for k in self._arrays}
        transform = self.dataset.transform
        output = transform(**sample) if transform else sample
        return self._post(self.dataset, index, output)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __getattr__(self, name):  # image_files, plot(), ...: the wrapped dataset's
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


def staged(dataset, cache_dir: str | Path | None, hashes: Mapping[str, str] | None = None, workers: int | None = None):
    """`dataset` served from staged arrays in `cache_dir` (staged first if needed), or
    `dataset` itself when cache_dir is None or the dataset cannot be staged (with a warning)."""
    if cache_dir is None or isinstance(dataset, StagedDataset):
        return dataset
    try:
        with _rng_kept():
            return StagedDataset(dataset, stage(dataset, cache_dir, hashes=hashes, workers=workers))
    except StagingUnsupported as e:
        warnings.warn(f"data staging skipped for {type(dataset).__name__}: {e}", stacklevel=2)
        return dataset


@contextlib.contextmanager
def _rng_kept():
    """Staging draws from torch's global generator (its decode loader's worker seeds) only when
    it decodes: restore every generator, so that a run is the same whether the split was staged
    now, earlier or not at all (sampler order, worker seeds, augmentations, model init)."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
