#!/usr/bin/env python3
"""Data loading versus training, per task, on the sample data: samples per second of the
training data loader alone (read, decode, augment, collate) for several worker counts, and of
full training steps (loader + forward + backward) through the same TerraTorch config.

If the loader alone is not several times faster than a training step, the GPU (or CPU) waits
for data: raise num_workers. This measurement chose the 'auto' worker rule in geofm/jobs.py.

    .venv/bin/python benchmarks/dataloader.py [--workers 0,1,2] [--batches 12] [--chips 96] [--no-training]

--single-threaded-workers pins OpenCV, torch and GDAL to one thread inside each loader worker,
to see whether many-core machines lose loader throughput to thread oversubscription.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
REPO = Path(__file__).resolve().parent.parent


# Training chips per task: the bundled sample has 8-12, 2-3 batches per epoch, too few for
# loader workers to overlap (a 16-core probe saw no gain from 4-15 workers on them).
SPLITS = {
    "crop": lambda n: {"training": n, "validation": 3},
    "landslide": lambda n: {"train": n, "validation": 4, "test": 4},
    "biomass": lambda n: {"train": n, "val": 3, "test": 3},
}


def rendered_config(task: str, work: Path, chips: int) -> Path:
    import yaml

    from geofm import render, sample_data
    from geofm.config import cell_settings, resolve
    from geofm.tasks import TASKS
    from geofm.tasks.base import write_split_lists

    data = work / task
    sample_data.write(task, data, seed=0, counts=SPLITS[task](chips))
    splits = work / "splits"
    splits.mkdir(exist_ok=True)
    if task == "crop":
        write_split_lists(TASKS[task].holdout_split(data), splits)
    experiment = resolve(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), root=REPO)
    experiment["tasks"][task]["data_root"] = str(data)
    settings = cell_settings(experiment, task, "tiny", 0)
    paths = {"data_root": str(data), "run_dir": str(work / "run" / task), "splits_dir": str(splits), "ckpt_path": None}
    path = work / f"{task}.yaml"
    path.write_text(
        yaml.safe_dump(render.render(Path(experiment["tasks"][task]["recipe"]).read_text(), settings, paths))
    )
    return path


def single_threaded(_worker_id: int) -> None:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    os.environ["GDAL_NUM_THREADS"] = "1"


def loader_rate(config: Path, workers: int, batches: int, single_threaded_workers: bool = False) -> float:
    from geofm.training import build_cli, runtime_settings

    trainer = {
        "accelerator": "cpu",
        "precision": "32-true",
        "num_workers": workers,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 2,
        "tf32": False,
    }
    cli = build_cli(config, runtime_settings(trainer, threads=max(1, workers + 1)))
    cli.datamodule.setup("fit")
    loader = cli.datamodule.train_dataloader()  # sample datasets are small: loop over epochs
    if single_threaded_workers:
        loader.worker_init_fn = single_threaded
    samples, seen, t0 = 0, 0, None
    while seen <= batches:
        for batch in loader:
            if seen == 1:  # the first batch includes worker start-up
                t0, samples = time.perf_counter(), 0
            samples += len(batch["image"])
            seen += 1
            if seen > batches:
                break
    return samples / (time.perf_counter() - t0)


def training_rate(config: Path, batches: int) -> float:
    from geofm.training import build_cli, runtime_settings
    from geofm.usage import Throughput

    trainer = {
        "accelerator": "cpu",
        "precision": "32-true",
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
        "prefetch_factor": 2,
        "tf32": False,
    }
    extra = ["--trainer.callbacks+=geofm.usage.Throughput", f"--trainer.max_steps={batches}", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={config.parent}", "--trainer.logger=false", "--lr_scheduler=null"]  # fmt: skip
    cli = build_cli(config, runtime_settings(trainer, threads=os.cpu_count() or 1), extra)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
    return throughput.steady_per_second or throughput.per_second


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--tasks", default="crop,landslide,biomass")
    parser.add_argument("--chips", type=int, default=96, help="training chips per task")
    parser.add_argument("--no-training", action="store_true", help="measure the loader only")
    parser.add_argument("--single-threaded-workers", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="geofm-dl-") as tmp:
        for task in args.tasks.split(","):
            config = rendered_config(task, Path(tmp), args.chips)
            loader = {
                int(w): loader_rate(config, int(w), args.batches, args.single_threaded_workers)
                for w in args.workers.split(",")
            }
            rows.append((task, loader, float("nan") if args.no_training else training_rate(config, args.batches)))
    workers = sorted(rows[0][1])
    print(
        f"{'task':<11}"
        + "".join(f"{f'loader w={w}':>15}" for w in workers)
        + f"{'train step':>13}  (samples/s, CPU, {os.cpu_count()} cores)"
    )
    for task, loader, train in rows:
        print(f"{task:<11}" + "".join(f"{loader[w]:>15.1f}" for w in workers) + f"{train:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
