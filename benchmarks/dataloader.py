#!/usr/bin/env python3
"""Data loading per task on sample data in each dataset's real on-disk format: samples per
second of the training loader alone (read, decode, augment, collate) for 0/1/2 workers, the
scaling from 1 to 2 workers (floor: 1.7x on a 2-core machine), the CPU each sample costs in the
workers and in the main process, and full training steps through the same config (--no-training skips them).

Modes (each on the same data, interleaved so that load from other processes hits all alike):
  baseline  the workflow's loaders before geofm.loading (as geofm.training._tune_loaders built them)
  tuned     + geofm.loading: per-worker thread limits and GDAL environment, loader settings
  staged    + the opt-in staging: each split decoded once into memory-mapped arrays

    .venv/bin/python benchmarks/dataloader.py               # after: tuned and staged
    .venv/bin/python benchmarks/dataloader.py --baseline    # before: the workflow as it was
    .venv/bin/python benchmarks/dataloader.py --modes baseline,tuned,staged --repeats 5
    taskset -c 0 .venv/bin/python benchmarks/dataloader.py  # a job given fewer CPUs than the machine has

Rates are medians over --repeats; the 2w/1w ratio is the median of ratios paired within each
repeat. Other processes on the machine lower the rates: the load average is printed beside them,
and the 'model' column gives the 2w/1w ratio that the measured CPU per sample (workers, main
process) allows on otherwise idle cores. 'cores used' is the CPU the loader's processes got per
second of wall time: with Linux's autogroup scheduling (on here) a session gets its share of
the CPUs while others are busy, however many workers it starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = ("baseline", "tuned", "staged")
FLOOR = 1.7

# Training chips per task: the bundled sample has 8-12, 2-3 batches per epoch, too few for
# loader workers to overlap. The measured loaders draw from one long shuffled epoch.
SPLITS = {
    "crop": lambda n: {"training": n, "validation": 3},
    "landslide": lambda n: {"train": n, "validation": 4, "test": 4},
    "biomass": lambda n: {"train": n, "val": 3, "test": 3},
}


def rendered_config(task: str, work: Path, chips: int, batch_size: int = 0) -> Path:
    import yaml

    from geofm import render, sample_data
    from geofm.config import cell_settings, resolve
    from geofm.tasks import TASKS
    from geofm.tasks.base import write_split_lists

    data = work / task
    sample_data.write(task, data, seed=0, counts=SPLITS[task](chips))
    splits = work / "splits"
    splits.mkdir(exist_ok=True)
    if TASKS[task].holdout:
        write_split_lists(TASKS[task].holdout_split(data), splits)
    experiment = resolve(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), root=REPO)
    experiment["tasks"][task]["data_root"] = str(data)
    settings = cell_settings(experiment, task, "tiny", 0)
    if batch_size:
        settings["overrides"]["batch_size"] = batch_size
    paths = {"data_root": str(data), "run_dir": str(work / "run" / task), "splits_dir": str(splits), "ckpt_path": None}
    path = work / f"{task}.yaml"
    path.write_text(
        yaml.safe_dump(render.render(Path(experiment["tasks"][task]["recipe"]).read_text(), settings, paths))
    )
    return path


# ---------------------------------------------------------------- CPU accounting from /proc
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds and minor page faults of a process, all its threads."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[7])


def _snapshot(pids: list[int]) -> dict[int, tuple[float, int]]:
    return {pid: _proc_cpu(pid) for pid in pids}


# ---------------------------------------------------------------- loaders
TRAINER = {"accelerator": "cpu", "precision": "32-true", "pin_memory": False, "persistent_workers": True, "tf32": False}


class Task:
    """One task's datamodule, built once through the workflow's job code, and its loaders."""

    def __init__(self, task: str, config: Path, stage_dir: Path, prefetch: int):
        from geofm.training import build_cli, runtime_settings

        self.task, self.prefetch, self.stage_dir = task, prefetch, stage_dir
        rt = runtime_settings({**TRAINER, "num_workers": 0, "prefetch_factor": prefetch}, threads=1)
        self.cli = build_cli(config, rt)
        self.cli.datamodule.setup("fit")
        files = getattr(self.cli.datamodule.train_dataset, "image_files", [])
        self.data_dirs = sorted({str(Path(p).parent) for p in files})
        self.staging_s = None

    def loader(self, mode: str, workers: int, samples: int):
        """The training loader as the workflow builds it: before geofm.loading (baseline: what
        geofm.training._tune_loaders did until then) or after (tuned, staged: the proposed wiring)."""
        from geofm import loading, training

        dm = self.cli.datamodule
        dl = type(dm).train_dataloader(dm)  # TerraTorch's own loader, before the workflow re-creates it
        dl.sampler._num_samples = samples  # one long shuffled epoch
        if mode == "baseline":
            rt = {
                "num_workers": workers,
                "pin_memory": False,
                "persistent_workers": True,
                "prefetch_factor": self.prefetch,
            }
            return loading.make_loader(dl, rt, worker_init_fn=partial(training._seed_worker, chained=dl.worker_init_fn))
        dataset = dl.dataset
        if mode == "staged":
            t0 = time.perf_counter()
            dataset = loading.staged(dl.dataset, self.stage_dir)
            if self.staging_s is None:
                self.staging_s = time.perf_counter() - t0
        settings = loading.loader_settings(workers + 1, cuda=False, num_workers=workers, prefetch_factor=self.prefetch)
        init = loading.WorkerInit(dl.worker_init_fn, env=loading.worker_env(1, self.data_dirs))
        return loading.make_loader(
            dl, settings, dataset=dataset, worker_init_fn=partial(training._seed_worker, chained=init)
        )


def measure(loader, seconds: float, min_batches: int) -> dict:
    """Steady-state rate after a warm-up of 2 batches per worker (+2), and CPU per sample."""
    it = iter(loader)
    workers = loader.num_workers
    for _ in range(2 * workers + 2):
        next(it)
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    before, load = _snapshot(pids), os.getloadavg()[0]
    t0, samples, batches = time.perf_counter(), 0, 0
    while batches < min_batches or time.perf_counter() - t0 < seconds:
        samples += len(next(it)["image"])
        batches += 1
    wall = time.perf_counter() - t0
    after = _snapshot(pids)
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    cpu = {pid: after[pid][0] - before[pid][0] for pid in pids}
    faults = {pid: after[pid][1] - before[pid][1] for pid in pids}
    return {
        "rate": samples / wall,
        "main_ms": 1e3 * cpu[pids[0]] / samples,
        "worker_ms": 1e3 * sum(cpu[p] for p in pids[1:]) / samples,
        "worker_faults": sum(faults[p] for p in pids[1:]) / samples,
        "cores": sum(cpu.values()) / wall,  # CPU the loader got: below the workers when others take it
        "load": load,
    }


def training_rate(config: Path, batches: int) -> float:
    from geofm.training import build_cli, runtime_settings
    from geofm.usage import Throughput

    trainer = {**TRAINER, "num_workers": 0, "persistent_workers": False, "prefetch_factor": 2}
    extra = ["--trainer.callbacks+=geofm.usage.Throughput", f"--trainer.max_steps={batches}", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={config.parent}", "--trainer.logger=false", "--lr_scheduler=null"]  # fmt: skip
    cli = build_cli(config, runtime_settings(trainer, threads=os.cpu_count() or 1), extra)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
    return throughput.steady_per_second or throughput.per_second


def _paired(rows: dict, w: int) -> float | None:
    """Median over repeats of rate(w) / rate(1 worker), each pair measured back to back."""
    if 1 not in rows or w not in rows or w == 1:
        return None
    return statistics.median(b["rate"] / a["rate"] for a, b in zip(rows[1], rows[w]))


def capacity(rows: list[dict], workers: int, cpus: int) -> float:
    """Samples/s the measured CPU costs allow on `cpus` otherwise idle cores: each worker at
    1/(CPU per sample), all processes together within the cores, the main process on its own.
    A model from the CPU accounting (robust to other load), not a measurement."""
    worker_ms = statistics.median(r["worker_ms"] for r in rows)
    main_ms = max(1e-3, statistics.median(r["main_ms"] for r in rows))
    if workers == 0:
        return 1000 / main_ms
    return min(workers * 1000 / worker_ms, cpus * 1000 / (worker_ms + main_ms), 1000 / main_ms)


def table(results: dict, tasks: list[str], modes: list[str], workers: list[int]) -> str:
    from geofm import loading

    cpus = loading.usable_cpus()
    top = max(workers)
    more = top > 2 and 1 in workers  # a many-core host: also the scaling to the most workers
    head = f"{'task':<11}{'mode':<10}" + "".join(f"{f'w={w}':>9}" for w in workers) + f"{'2w/1w':>8}{'floor':>7}"
    head += f"{f'{top}w/1w':>8}" if more else ""
    head += f"{'model':>7}" if {1, 2} <= set(workers) else ""
    lines = [head + f"   CPU ms/sample at w={top}: workers | main   cores used    load"]
    for task in tasks:
        for mode in modes:
            rows = {w: results[(task, mode, w)] for w in workers}
            line = f"{task:<11}{mode:<10}" + "".join(
                f"{statistics.median(r['rate'] for r in rows[w]):>9.1f}" for w in workers
            )
            ratio = _paired(rows, 2)
            line += f"{ratio:>8.2f}{'met' if ratio >= FLOOR else 'MISSED':>7}" if ratio else f"{'':>15}"
            line += f"{_paired(rows, top):>8.2f}" if more else ""
            if {1, 2} <= set(workers):
                line += f"{capacity(rows[2], 2, cpus) / capacity(rows[1], 1, cpus):>7.2f}"
            worker_ms = statistics.median(r["worker_ms"] for r in rows[top])
            main_ms = statistics.median(r["main_ms"] for r in rows[top])
            loads = [r["load"] for w in workers for r in rows[w]]
            cores = "|".join(f"{statistics.median(r['cores'] for r in rows[w]):.2f}" for w in workers)
            lines.append(
                line + f"{worker_ms:>18.1f} | {main_ms:<5.2f}  {cores:>13}   {min(loads):.1f}-{max(loads):.1f}"
            )
        if results.get((task, "staging_s")) is not None:
            lines.append(f"{'':<11}staging the training split once: {results[(task, 'staging_s')]:.1f} s")
        if (task, "train") in results:
            lines.append(
                f"{'':<11}training step (tiny model, CPU, 0 workers): {results[(task, 'train')]:.1f} samples/s"
            )
    lines.append(
        f"(samples/s, median of the repeats; floor: 2 workers >= {FLOOR}x 1 worker; load: 1-min load average;"
        f" model: 2w/1w on {cpus} idle cores from the measured CPU per sample, see capacity())"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true", help="only the workflow's loaders as they were (before)")
    parser.add_argument("--modes", default="tuned,staged", help=f"comma separated, of {', '.join(MODES)}")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--tasks", default="crop,landslide,biomass")
    parser.add_argument("--chips", type=int, default=96, help="training chips per task")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="8: the recipes' own; 0: the sample experiment's (4, 4, 2)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point (at least)")
    parser.add_argument("--min-batches", type=int, default=12)
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_factor")
    parser.add_argument("--sharing", choices=["file_descriptor", "file_system"], help="torch sharing strategy")
    parser.add_argument("--no-training", action="store_true", help="skip timing training steps (tiny model, CPU)")
    parser.add_argument("--batches", type=int, default=12, help="training steps timed")
    args = parser.parse_args()
    modes = ["baseline"] if args.baseline else args.modes.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    if args.sharing:
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy(args.sharing)
    from geofm import loading

    cpus = loading.cpu_report()
    print(
        f"CPUs: machine {cpus['os_cpu_count']}, usable {cpus['usable_cpus']} (affinity {cpus['affinity']}, "
        f"quota {cpus['cgroup_quota_cpus']}); modes {', '.join(modes)}; batch size {args.batch_size or 'sample'};"
        f" {args.repeats} repeats of >= {args.seconds} s",
        flush=True,
    )
    if (
        Path("/proc/sys/kernel/sched_autogroup_enabled").is_file()
        and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    ):
        print(
            "note: the kernel shares the CPUs between sessions (sched_autogroup): while another session is busy"
            " this one gets its share however many workers it starts ('cores used' below); measure the scaling"
            " floor on an otherwise idle machine",
            flush=True,
        )
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="geofm-dl-") as tmp:
        for task in args.tasks.split(","):
            config = rendered_config(task, Path(tmp), args.chips, args.batch_size)
            bench = Task(task, config, Path(tmp) / "staging", args.prefetch)
            samples = 10**6
            points = [(m, w) for m in modes for w in workers]
            for rep in range(args.repeats):
                for mode, w in points if rep % 2 == 0 else points[::-1]:
                    r = measure(bench.loader(mode, w, samples), args.seconds, args.min_batches)
                    results.setdefault((task, mode, w), []).append(r)
                    print(
                        f"  {task:<10}{mode:<9} w={w} rep {rep}: {r['rate']:7.1f} samples/s, CPU/sample"
                        f" workers {r['worker_ms']:5.1f} ms, main {r['main_ms']:5.2f} ms, load {r['load']:.2f}",
                        flush=True,
                    )
            results[(task, "staging_s")] = bench.staging_s
            if not args.no_training:
                results[(task, "train")] = training_rate(config, args.batches)
    print()
    print(table(results, args.tasks.split(","), modes, workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
