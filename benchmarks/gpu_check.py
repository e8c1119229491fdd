#!/usr/bin/env python3
"""GPU check: Prithvi-EO-2.0 300M (random init) fine-tuned on synthetic crop chips for a fixed
number of steps, once through the workflow's fine-tune job (geofm.training.finetune, what the
`finetune` rule runs) and once through plain TerraTorch (`terratorch fit` in-process) with the
same rendered config, precision and loader workers. Prints samples per second in the steady
state, peak GPU memory and mean GPU utilisation for both, and the ratio.

Floors: the workflow within 3% of plain TerraTorch; utilisation above 90% in steady state.
Each run is a separate process; the import and model build are outside the measured window.

    python benchmarks/gpu_check.py --out results/gpu_check      # on a machine with a GPU
    benchmarks/gpu_check.sh                                     # the same on the lent GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
REPO = Path(__file__).resolve().parent.parent


def prepare(work: Path, chips: int, batch: int, steps: int, workers: int, backbone: str, neck: list[int]) -> Path:
    """Synthetic crop data in the real layout, the hold-out split, and the cell's rendered config."""
    import yaml

    from geofm import render, sample_data
    from geofm.config import cell_settings, validate_schema
    from geofm.tasks import TASKS
    from geofm.tasks.base import write_split_lists

    data = work / "crop"
    if not data.exists():
        sample_data.write("crop", data, seed=0, counts={"training": chips, "validation": 8})
    splits = work / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    write_split_lists(TASKS["crop"].holdout_split(data), splits)
    experiment = validate_schema({
        "models": {"prithvi_300m": {"backbone": backbone, "neck_indices": neck}},
        "tasks": {"crop": {"data_root": str(data), "overrides": {
            "batch_size": batch, "max_epochs": 1000,
            "set": {
                "trainer.max_steps": steps,
                "trainer.limit_val_batches": 0,       # training throughput only
                "trainer.num_sanity_val_steps": 0,
                "trainer.callbacks.0.init_args.monitor": None,  # keep the last checkpoint
                "trainer.log_every_n_steps": 50,
                "lr_scheduler": None,  # the recipe's plateau scheduler needs validation
            },
        }}},
    })  # fmt: skip
    experiment["tasks"]["crop"]["data_root"] = str(data)
    settings = cell_settings({**experiment, "enabled_tasks": ["crop"]}, "crop", "prithvi_300m", 0)
    settings["trainer"] = {**settings["trainer"], "precision": "bf16-mixed", "num_workers": workers}
    paths = {"data_root": str(data), "run_dir": str(work / "run"), "splits_dir": str(splits), "ckpt_path": None}
    config = render.render((REPO / "config" / "tasks" / "crop.yaml").read_text(), settings, paths)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "trainer.json").write_text(json.dumps(settings["trainer"]))
    return path


def child(mode: str, config: Path, work: Path, workers: int, threads: int) -> dict:
    import torch

    from geofm import training
    from geofm.usage import Monitor, Throughput

    trainer = json.loads((work / "trainer.json").read_text())
    run_dir = work / f"run_{mode}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "workflow":
        out = {k: str(run_dir / f"{k}.out") for k in ("checkpoint", "curves", "resources", "effective_config")}
        training.finetune(config, run_dir, trainer, threads, out)
        report = json.loads(Path(out["resources"]).read_text())
        samples_per_s = report["steady_train_samples_per_s"]
    else:
        from terratorch.cli_tools import build_lightning_cli

        args = [
            "fit", "--config", str(config), "--trainer.precision=bf16-mixed",
            f"--data.init_args.num_workers={workers}",
            "--trainer.callbacks+=geofm.usage.Throughput",  # read-only timing, as in the workflow run
        ]  # fmt: skip
        torch.set_num_threads(threads)
        with Monitor() as monitor:
            cli = build_lightning_cli(args=args, run=True)  # exactly what `terratorch fit` runs
        throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
        report = monitor.report(window=throughput.steady_window())
        samples_per_s = throughput.steady_per_second
    gpu = report.get("gpu") or {}
    return {
        "mode": mode,
        "steady_samples_per_s": samples_per_s,
        "peak_gpu_memory_mb": gpu.get("peak_memory_mb"),
        "peak_torch_allocated_mb": gpu.get("peak_torch_allocated_mb"),
        "steady_utilisation_pct": gpu.get("steady_utilisation_pct"),
        "mean_utilisation_pct": gpu.get("mean_utilisation_pct"),
        "gpu": gpu.get("name"),
        "wall_s": report.get("wall_s"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--chips", type=int, default=240, help="synthetic training chips")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 2) - 1))
    parser.add_argument("--order", default="plain,workflow", help="runs, in order (comma separated)")
    parser.add_argument("--backbone", default="prithvi_eo_v2_300")
    parser.add_argument("--neck", default="5,11,17,23", help="encoder layers fed to the decoder")
    parser.add_argument("--child", choices=["plain", "workflow"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) - args.workers)
    if args.child:
        result = child(args.child, args.out / "config.yaml", args.out, args.workers, threads)
        (args.out / f"{args.child}.json").write_text(json.dumps(result, indent=2))
        return 0

    t0 = time.time()
    prepare(
        args.out,
        args.chips,
        args.batch,
        args.steps,
        args.workers,
        args.backbone,
        [int(i) for i in args.neck.split(",")],
    )
    print(f"data and config ready in {time.time() - t0:.0f} s", flush=True)
    results = []
    for mode in args.order.split(","):
        t = time.time()
        subprocess.run(
            [sys.executable, __file__, "--child", mode, "--out", str(args.out), "--workers", str(args.workers)],
            check=True,
        )
        results.append(json.loads((args.out / f"{mode}.json").read_text()))
        print(f"{mode}: {time.time() - t:.0f} s", flush=True)
    print(
        f"\n{args.backbone}, crop, batch {args.batch}, {args.steps} steps, bf16-mixed, {args.workers} loader workers, {results[0]['gpu']}"
    )
    print(f"{'run':<10}{'samples/s':>12}{'peak GPU MB':>14}{'util % (steady)':>17}{'util % (all)':>14}")
    for r in results:
        print(
            f"{r['mode']:<10}{r['steady_samples_per_s']:>12}{r['peak_gpu_memory_mb']!s:>14}{r['steady_utilisation_pct']!s:>17}{r['mean_utilisation_pct']!s:>14}"
        )
    by_mode = {r["mode"]: r for r in results}
    if {"plain", "workflow"} <= set(by_mode):
        ratio = by_mode["workflow"]["steady_samples_per_s"] / by_mode["plain"]["steady_samples_per_s"]
        print(f"workflow / plain samples per second: {ratio:.3f} (floor: >= 0.97)")
        (args.out / "summary.json").write_text(json.dumps({"ratio": ratio, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
