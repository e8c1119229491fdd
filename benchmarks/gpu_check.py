#!/usr/bin/env python3
"""GPU check: Prithvi-EO-2.0 300M (random init) fine-tuned on synthetic crop chips for a fixed
number of steps, each run in its own process with the same rendered config, precision and
loader workers:

  plain     `terratorch fit` in-process: TerraTorch's own loaders, given the workflow's workers
            and pinned memory (TerraTorch's datamodule exposes no persistent workers or prefetch)
  workflow  geofm.training.finetune, what the `finetune` rule runs, as the tree has it
  staged    the workflow's job code with geofm.loading applied to its loaders (per-worker thread
            and GDAL limits, loader settings, the training split staged once into memory-mapped
            arrays under --staging): what geofm.training does once it wires geofm.loading in
  ceiling   no loading at all: one batch, already on the GPU, trained on repeatedly (the rate
            and utilisation the GPU allows; what a loader can at most reach)

For each: steady-state samples/s, GPU busy % (NVML, steady state), peak memory, and the share of
each step spent waiting for the next batch (data wait; near 0 when the GPU is the limit). The
CPUs the job may use (affinity, cgroup quota) are recorded, as they decide how many workers help.

Floors: GPU busy >= 90% in steady state; the workflow (staged) >= 0.99x plain TerraTorch at the
same loader settings and >= 3x 17.5 samples/s (the first H100 run).

    python benchmarks/gpu_check.py --out results/gpu_check      # on a machine with a GPU
    benchmarks/gpu_check.sh                                     # the same on the lent GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FLOOR_UTIL, FLOOR_RATIO, FLOOR_RATE = 90.0, 0.99, 3 * 17.5


class DataWait(pl.Callback):
    """Per training step: the time from the end of one step to the start of the next (fetching
    and transferring the batch: the data wait) and from its start to its end (the step).
    Written at the end of training to $GPU_CHECK_DATA_WAIT (a JSON file)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._end = self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._end is not None:
            self.waits.append(self._start - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        self.steps.append(self._end - self._start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end = None  # an epoch boundary is not a data wait

    def on_train_end(self, trainer, pl_module) -> None:
        skip = max(1, len(self.steps) // 10)
        waits, steps = self.waits[skip:], self.steps[skip:]
        summary = {}
        if waits and steps:
            summary = {
                "median_wait_ms": round(1e3 * statistics.median(waits), 2),
                "median_step_ms": round(1e3 * statistics.median(steps), 2),
                "wait_share": round(sum(waits) / (sum(waits) + sum(steps)), 3),
            }
        if os.environ.get("GPU_CHECK_DATA_WAIT"):
            Path(os.environ["GPU_CHECK_DATA_WAIT"]).write_text(json.dumps(summary))


def prepare(
    work: Path, chips: int, batch: int, steps: int, workers: int, backbone: str, neck: list[int] | None
) -> Path:
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
    settings["trainer"] = {
        **settings["trainer"],
        "precision": "bf16-mixed",
        "num_workers": workers,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 2,
    }
    paths = {"data_root": str(data), "run_dir": str(work / "run"), "splits_dir": str(splits), "ckpt_path": None}
    config = render.render((REPO / "config" / "tasks" / "crop.yaml").read_text(), settings, paths)
    config["trainer"]["callbacks"].append({"class_path": "gpu_check.DataWait"})
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "trainer.json").write_text(json.dumps(settings["trainer"]))
    return path


def _apply_loading(datamodule, rt: dict, staging: Path) -> None:
    """geofm.loading on the loaders geofm.training built, as the proposed _tune_loaders wiring does."""
    from geofm import loading

    data_dirs = sorted({str(Path(p).parent) for p in getattr(datamodule.train_dataset, "image_files", [])})

    def wrap(factory):
        def make(*args, **kwargs):
            dl = factory(*args, **kwargs)
            dataset = loading.staged(dl.dataset, staging)
            init = loading.WorkerInit(dl.worker_init_fn, env=loading.worker_env(1, data_dirs))
            return loading.make_loader(dl, rt, dataset=dataset, worker_init_fn=init)

        return make

    datamodule.train_dataloader = wrap(datamodule.train_dataloader)


class _Repeat:
    """A loader stand-in: the same batch, already on the GPU, `n` times per epoch."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return ({**self.batch} for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def child(mode: str, config: Path, work: Path, workers: int, threads: int, staging: Path) -> dict:
    import torch

    from geofm import loading, training
    from geofm.usage import Monitor, Throughput

    trainer = json.loads((work / "trainer.json").read_text())
    run_dir = work / f"run_{mode}"
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    wait_file = work / f"{mode}.data_wait.json"
    os.environ["GPU_CHECK_DATA_WAIT"] = str(wait_file)
    if mode == "workflow":
        out = {k: str(run_dir / f"{k}.out") for k in ("checkpoint", "curves", "resources", "effective_config")}
        job = {"trainer": trainer, "task": "crop", "data_root": str(work / "crop"), "splits_dir": str(work / "splits"),
               "allow_selection_on_reported_split": False, "preflight": False}  # fmt: skip
        training.finetune(config, run_dir, job, threads, out)
        report = json.loads(Path(out["resources"]).read_text())
        samples_per_s = report["steady_train_samples_per_s"]
    elif mode == "plain":
        from terratorch.cli_tools import build_lightning_cli

        args = [
            "fit", "--config", str(config), "--trainer.precision=bf16-mixed",
            f"--data.init_args.num_workers={workers}", "--data.init_args.pin_memory=true",
            "--trainer.callbacks+=geofm.usage.Throughput",  # read-only timing, as in the workflow run
        ]  # fmt: skip
        torch.set_num_threads(threads)
        with Monitor() as monitor:
            cli = build_lightning_cli(args=args, run=True)  # exactly what `terratorch fit` runs
        throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
        report = monitor.report(window=throughput.steady_window())
        samples_per_s = throughput.steady_per_second
    else:  # staged, ceiling: the workflow's job code, loaders changed before fit
        rt = training.runtime_settings(trainer, threads)
        with Monitor() as monitor:
            cli = training.build_cli(config, rt, ["--trainer.callbacks+=geofm.usage.Throughput"])
            dm = cli.datamodule
            t0 = time.perf_counter()
            if mode == "staged":
                _apply_loading(dm, rt, staging)
                dm.setup("fit")
                dm.train_dataloader()  # stages the split (timed here, outside the training window)
            else:
                dm.setup("fit")
                batch = next(iter(dm.train_dataloader()))
                device = cli.trainer.strategy.root_device
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                dm.train_dataloader = lambda: _Repeat(batch, cli.trainer.max_steps + 10)
            report["prepare_s"] = round(time.perf_counter() - t0, 1)
            cli.trainer.fit(cli.model, datamodule=dm)
        throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
        report.update(monitor.report(window=throughput.steady_window()))
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
        "prepare_s": report.get("prepare_s"),
        "data_wait": json.loads(wait_file.read_text()) if wait_file.is_file() else {},
        "workers": workers,
        "cpus": loading.cpu_report(),
    }


def main() -> int:
    from geofm import loading

    usable = loading.usable_cpus()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--chips", type=int, default=240, help="synthetic training chips")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument(
        "--workers", type=int, default=min(8, max(1, usable - 1)), help="default: usable CPUs - 1, <= 8"
    )
    parser.add_argument("--order", default="plain,workflow,staged,ceiling", help="runs, in order (comma separated)")
    parser.add_argument("--staging", type=Path, default=Path("/tmp/geofm-gpu-check-staging"))
    parser.add_argument("--backbone", default="prithvi_eo_v2_300")
    parser.add_argument("--neck", default="5,11,17,23", help="encoder layers fed to the decoder ('auto': the schema's)")
    parser.add_argument("--child", choices=["plain", "workflow", "staged", "ceiling"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, usable - args.workers)
    if args.child:
        result = child(args.child, args.out / "config.yaml", args.out, args.workers, threads, args.staging)
        (args.out / f"{args.child}.json").write_text(json.dumps(result, indent=2))
        return 0

    cpus = loading.cpu_report()
    print(f"CPUs: {json.dumps(cpus)}", flush=True)
    t0 = time.time()
    prepare(
        args.out,
        args.chips,
        args.batch,
        args.steps,
        args.workers,
        args.backbone,
        None if args.neck == "auto" else [int(i) for i in args.neck.split(",")],
    )
    print(f"data and config ready in {time.time() - t0:.0f} s", flush=True)
    results = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    }
    for mode in args.order.split(","):
        t = time.time()
        run = [sys.executable, __file__, "--child", mode, "--out", str(args.out), "--workers", str(args.workers)]
        done = subprocess.run(run + ["--staging", str(args.staging)], env=env)
        if done.returncode:
            print(f"{mode}: FAILED (exit {done.returncode})", flush=True)
            continue
        results.append(json.loads((args.out / f"{mode}.json").read_text()))
        print(f"{mode}: {time.time() - t:.0f} s", flush=True)
    print(
        f"\n{args.backbone}, crop, batch {args.batch}, {args.steps} steps, bf16-mixed, {args.workers} loader workers,"
        f" {results[0]['gpu'] if results else '?'}; usable CPUs {cpus['usable_cpus']} of {cpus['os_cpu_count']}"
    )
    print(
        f"{'run':<10}{'samples/s':>11}{'busy % steady':>15}{'busy % all':>12}{'data wait':>11}{'wait ms':>9}{'step ms':>9}{'peak GPU MB':>13}"
    )
    for r in results:
        w = r["data_wait"]
        print(
            f"{r['mode']:<10}{r['steady_samples_per_s']!s:>11}{r['steady_utilisation_pct']!s:>15}"
            f"{r['mean_utilisation_pct']!s:>12}{w.get('wait_share', '-')!s:>11}{w.get('median_wait_ms', '-')!s:>9}"
            f"{w.get('median_step_ms', '-')!s:>9}{r['peak_gpu_memory_mb']!s:>13}"
        )
    by_mode = {r["mode"]: r for r in results}
    summary: dict = {"cpus": cpus, "workers": args.workers, "runs": results}
    best = by_mode.get("staged") or by_mode.get("workflow")
    if best and "plain" in by_mode:
        rate, plain = best["steady_samples_per_s"], by_mode["plain"]["steady_samples_per_s"]
        util = best["steady_utilisation_pct"]
        summary["floors"] = {
            "run": best["mode"],
            "ratio_to_plain": round(rate / plain, 3),
            "ratio_floor_met": rate / plain >= FLOOR_RATIO,
            "rate_floor_met": rate >= FLOOR_RATE,
            "busy_floor_met": util is not None and util >= FLOOR_UTIL,
        }
        print(
            f"{best['mode']} / plain samples per second: {rate / plain:.3f} (floor >= {FLOOR_RATIO});"
            f" {rate} samples/s (floor >= {FLOOR_RATE}); busy {util}% (floor >= {FLOOR_UTIL}%)"
        )
    if "workflow" in by_mode and "plain" in by_mode:
        ratio = by_mode["workflow"]["steady_samples_per_s"] / by_mode["plain"]["steady_samples_per_s"]
        print(f"workflow (as wired) / plain: {ratio:.3f}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
