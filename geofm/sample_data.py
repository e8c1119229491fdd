"""Small, seeded synthetic datasets in each real dataset's on-disk format.

Each task writes its own (`Task.write_sample`, in geofm/tasks/<task>.py): file and folder names,
split files, band counts and order, dtypes, nodata values, CRS and transforms follow the real
downloads, so pointing data_root at the real data changes nothing else. Labels are a function of
the bands, so a fine-tuned model can beat a trivial baseline. Files are compressed (transparent
to rasterio and h5py) to keep them small.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from geofm.tasks import TASKS

# Bump when a writer changes what it writes: caches of generated data are keyed by it.
GENERATOR_VERSION = 1


def write(task: str, root: Path, seed: int, counts: dict | None = None, compressed: bool = True) -> None:
    """Write one task's sample dataset into root (replaced if it exists); `counts` changes the
    number of chips per split and `compressed=False` writes uncompressed files, as most published
    chips are (benchmarks use both)."""
    spec = TASKS[task]
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec.write_sample(tmp, np.random.default_rng([seed, spec.stream]), counts or spec.sample_counts, compressed)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
