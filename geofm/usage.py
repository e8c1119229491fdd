"""Resource usage of one job: wall and CPU time, peak memory, and GPU use through NVML."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time

import lightning.pytorch as pl


class Throughput(pl.Callback):
    """Training samples per second, counted over the training batches only (no validation).

    It also keeps each training batch's end time, so that the steady state (after the first
    10% of batches: warm-up, autotuning, worker start) can be measured on its own.
    """

    WARMUP = 0.1

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self.batch_ends: list[tuple[float, int]] = []  # (time, samples in the batch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        self.samples += len(image)
        self.batch_ends.append((time.perf_counter(), len(image)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._t0

    @property
    def per_second(self) -> float | None:
        return round(self.samples / self.seconds, 3) if self.seconds > 0 else None

    def steady_window(self) -> tuple[float, float] | None:
        skip = max(1, int(len(self.batch_ends) * self.WARMUP))
        if len(self.batch_ends) - skip < 2:
            return None
        return self.batch_ends[skip][0], self.batch_ends[-1][0]

    @property
    def steady_per_second(self) -> float | None:
        """Samples per second between the end of warm-up and the last batch (includes any
        validation in between, so it is a lower bound of the pure training rate)."""
        window = self.steady_window()
        if window is None:
            return None
        skip = max(1, int(len(self.batch_ends) * self.WARMUP))
        samples = sum(n for _, n in self.batch_ends[skip + 1 :])
        return round(samples / (window[1] - window[0]), 3)


class _GpuSampler(threading.Thread):
    """Samples GPU utilisation and memory every `interval` seconds while the job runs."""

    def __init__(self, handle, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.handle, self.interval = handle, interval
        self.util: list[tuple[float, int]] = []  # (time, percent)
        self.peak_used = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import pynvml

        while not self._halt.wait(self.interval):
            try:
                self.util.append((time.perf_counter(), pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
                used = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
                self.peak_used = max(self.peak_used, used)
            except pynvml.NVMLError:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


class Monitor:
    """Context manager; `report()` returns the measured figures as a JSON-ready dict."""

    def __init__(self) -> None:
        self.gpu = None
        self.handle = None
        self.energy0 = None

    def __enter__(self) -> Monitor:
        self.wall0 = time.perf_counter()
        self.times0 = os.times()
        self._start_gpu()
        return self

    def _start_gpu(self) -> None:
        try:
            import torch

            if not torch.cuda.is_available():
                return
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            if visible and visible.split(",")[index].strip().isdigit():
                index = int(visible.split(",")[index])
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                self.energy0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            except pynvml.NVMLError:
                self.energy0 = None
            self.gpu = _GpuSampler(self.handle)
            self.gpu.start()
        except Exception:  # no driver or NVML: report CPU figures only
            self.gpu = None

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        t = os.times()
        self.cpu = (t.user - self.times0.user) + (t.system - self.times0.system)
        self.cpu += (t.children_user - self.times0.children_user) + (t.children_system - self.times0.children_system)
        if self.gpu:
            self.gpu.stop()

    def report(self, window: tuple[float, float] | None = None, **extra) -> dict:
        """Figures of the whole job; with `window` (perf_counter start, end) also the GPU
        utilisation within it (the training steady state)."""
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out = {
            "wall_s": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "cpu_hours": round(self.cpu / 3600, 6),
            "peak_rss_mb": round(own, 1),
            "peak_rss_worker_mb": round(children, 1),
            "host": platform.node(),
            "cpu_model": _cpu_model(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "scheduler_job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("LSB_JOBID"),
            "gpu": None,
        }
        if self.handle is not None:
            out["gpu"] = self._gpu_report(window)
        out.update(extra)
        return out

    def _gpu_report(self, window) -> dict:
        import pynvml
        import torch

        samples = self.gpu.util if self.gpu else []
        util = [u for _, u in samples]
        steady = [u for t, u in samples if window and window[0] <= t <= window[1]]
        report = {
            "name": pynvml.nvmlDeviceGetName(self.handle),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "peak_memory_mb": round(self.gpu.peak_used / 2**20, 1) if self.gpu else None,
            "peak_torch_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "mean_utilisation_pct": round(sum(util) / len(util), 1) if util else None,
            "steady_utilisation_pct": round(sum(steady) / len(steady), 1) if steady else None,
            "gpu_hours": round(self.wall / 3600, 6),
            "energy_j": None,
        }
        if self.energy0 is not None:
            try:
                report["energy_j"] = round(
                    (pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.energy0) / 1000, 1
                )
            except pynvml.NVMLError:
                pass
        return report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
