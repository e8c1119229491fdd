"""The heavy jobs of a cell: preflight, fine-tune and evaluate, all through TerraTorch's CLI.

Each builds TerraTorch's LightningCLI from the cell's rendered config exactly as
`terratorch fit --config ...` would, and only adds what the CLI lacks: hardware-dependent
'auto' settings, resource measurement, and a prediction pass whose outputs are saved.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # jobs never download; the fetch_weights rule does
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")  # avoids a DNS lookup at import

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from geofm import loading, splits  # noqa: E402
from geofm.metrics import PinnedMetrics  # noqa: E402
from geofm.tasks import SEGMENTATION, TASKS  # noqa: E402
from geofm.usage import Monitor, Throughput  # noqa: E402


def runtime_settings(trainer: dict, threads: int) -> dict:
    """Resolve the experiment's 'auto' trainer settings for the hardware this job runs on; the
    loader's from the CPUs the job may really use (geofm.loading.loader_settings)."""
    cuda = torch.cuda.is_available() and trainer["accelerator"] != "cpu"
    precision = trainer["precision"]
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if cuda else "32-true"
    loader = loading.loader_settings(threads, cuda, trainer["num_workers"], trainer["prefetch_factor"])
    pin = cuda if trainer["pin_memory"] == "auto" else trainer["pin_memory"]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "cpus": loader["cpus"],
        "num_workers": loader["num_workers"],
        "pin_memory": bool(pin),
        "persistent_workers": bool(trainer["persistent_workers"] and loader["num_workers"] > 0),
        "prefetch_factor": loader["prefetch_factor"],
        "tf32": bool(trainer["tf32"] and cuda),
        "torch_threads": loader["torch_threads"],  # loader workers get the other cores
    }


def _seed_augmentations(dataset, seed: int) -> None:
    """Albumentations 2 draws from its own generators, seeded from OS entropy unless told, so
    TerraTorch's augmentations differ run to run even after seed_everything: seed them."""
    import albumentations

    stack, seen = [dataset], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, albumentations.BaseCompose):
                value.set_random_seed(seed)
            elif isinstance(value, torch.utils.data.Dataset):
                stack.append(value)  # e.g. a Subset's dataset


def _seed_worker(worker_id: int, chained=None) -> None:
    # torch gives each worker a seed derived from the (seeded) main RNG, new every epoch.
    if chained is not None:
        chained(worker_id)
    info = torch.utils.data.get_worker_info()
    _seed_augmentations(info.dataset, info.seed % 2**32)


class DataFileError(RuntimeError):
    """Reading one file of a dataset failed during a job; the message names the file."""


class NamedReads(torch.utils.data.Dataset):
    """A dataset whose read errors name the file being read (TerraTorch's say only what failed,
    e.g. 'truncated file: eof = 5000'). validate_data checked every file before the run, so
    this catches a file that changed under the run or a failure its checks cannot see."""

    def __init__(self, dataset, files: list | None = None) -> None:
        self.dataset = dataset
        self.files = splits.dataset_files(dataset) if files is None else files

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as e:
            name = self.files[index] if self.files and index < len(self.files) else f"item {index} of the dataset"
            said = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataFileError(
                f"{name}: {type(e).__name__}: {said}; fix: re-download it (it passed validate_data before the run: "
                "it changed since, or the failure is one the checks cannot see)"
            ) from e


def _tune_loaders(datamodule, rt: dict, job: dict | None = None) -> None:
    """Re-create each stage's loader with the same dataset, sampler and collate, adding what not
    every TerraTorch datamodule exposes (pin_memory, persistent_workers, prefetch_factor), one
    thread per worker and no GDAL folder listing (geofm.loading), seeded augmentations, so that
    a cell re-run gives the same model, and read errors that name the file. With
    `job["stage_dir"]` (trainer.stage_data) the training and validation splits are served from
    staged arrays (bit-identical samples)."""
    from functools import partial

    job = job or {}
    stage_dir, manifest = job.get("stage_dir"), job.get("data_manifest")
    hashes = {}
    if stage_dir and manifest and Path(manifest).is_file():  # validate_data hashed every file already
        hashes = loading.hashes_from_manifest(manifest, job["data_root"])

    def wrap(factory, stage):
        def make(*args, **kwargs):
            dl = factory(*args, **kwargs)
            dataset = dl.dataset
            if stage_dir and stage in ("train", "val"):
                dataset = loading.staged(dataset, stage_dir, hashes=hashes)
            files = splits.dataset_files(dl.dataset)
            init = loading.WorkerInit(
                partial(_seed_worker, chained=dl.worker_init_fn),
                env=loading.worker_env(1, sorted({str(Path(f).parent) for f in files or []})),
            )
            if rt["num_workers"] == 0:
                _seed_augmentations(dl.dataset, int(torch.randint(2**31, ()).item()))
            return loading.make_loader(dl, rt, dataset=NamedReads(dataset, files), worker_init_fn=init)

        return make

    for stage in ("train", "val", "test", "predict"):
        name = f"{stage}_dataloader"
        setattr(datamodule, name, wrap(getattr(datamodule, name), stage))


def build_cli(config: Path, rt: dict, extra: list[str] = (), job: dict | None = None):
    from terratorch.cli_tools import build_lightning_cli

    torch.set_num_threads(max(1, rt["torch_threads"]))
    if rt["tf32"]:  # the API Lightning checks; the older allow_tf32 flags conflict with it
        torch.set_float32_matmul_precision("high")
    args = [
        "--config", str(config),
        f"--trainer.precision={rt['precision']}",
        f"--data.init_args.num_workers={rt['num_workers']}",
        *extra,
    ]  # fmt: skip
    cli = build_lightning_cli(args=args, run=False)
    _tune_loaders(cli.datamodule, rt, job)
    return cli


def _param_counts(model: torch.nn.Module) -> dict:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _epoch_curves(metrics_csv: Path, out: Path) -> None:
    """One row per epoch from Lightning's CSVLogger file (last value of each column)."""
    rows: dict[int, dict] = {}
    columns: list[str] = []
    if metrics_csv.is_file():
        with open(metrics_csv) as f:
            for row in csv.DictReader(f):
                if not row.get("epoch"):
                    continue
                merged = rows.setdefault(int(float(row["epoch"])), {})
                for key, value in row.items():
                    if value not in ("", None) and key not in ("step",) and not key.endswith("_step"):
                        merged[key.removesuffix("_epoch")] = value
                        if key.removesuffix("_epoch") not in columns:
                            columns.append(key.removesuffix("_epoch"))
    columns = ["epoch"] + sorted(c for c in columns if c != "epoch")
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for epoch in sorted(rows):
            writer.writerow({**rows[epoch], "epoch": epoch})


def _measured_splits(cli, config: Path, job: dict) -> dict:
    """Which chips select the checkpoint and which are reported; a leak is refused here, before
    any training (geofm.splits)."""
    splits_dir = Path(job["splits_dir"]) if job.get("splits_dir") else None
    facts = splits.measure(cli.datamodule, job["task"], Path(job["data_root"]), splits_dir)
    rendered = yaml.safe_load(Path(config).read_text())
    return splits.check(facts, rendered, job["task"], job["allow_selection_on_reported_split"])


def _selection_callback(trainer):
    """The ModelCheckpoint that monitors a metric (the rendered config guarantees one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitored = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    return monitored[0] if monitored else None


def _csv_log(trainer, run_dir: Path) -> Path:
    """Where the CSV logger wrote its metrics (the run folder unless the recipe says otherwise)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return run_dir / "logs" / "metrics.csv"


def finetune(config: Path, run_dir: Path, job: dict, threads: int, out: dict) -> None:
    """Check the splits (a leak is refused) and, with `job["preflight"]`, one batch of every stage
    (a broken cell fails in minutes); then fit, keep the checkpoint picked on the selection split,
    write curves and resources."""
    for stale in ("checkpoints", "logs", "preflight"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    rt = runtime_settings(job["trainer"], threads)
    with Monitor() as monitor:
        cli = build_cli(config, rt, ["--trainer.callbacks+=geofm.usage.Throughput"], job)
        facts = _measured_splits(cli, config, job)
        checked = _dev_run(cli, job, rt, run_dir) if job.get("preflight") else None
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    callback = _selection_callback(cli.trainer)
    if callback is None or not callback.best_model_path:
        raise RuntimeError("no checkpoint was selected: the recipe needs a ModelCheckpoint callback with a monitor")
    shutil.copyfile(callback.best_model_path, out["checkpoint"])
    throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
    _epoch_curves(_csv_log(cli.trainer, run_dir), Path(out["curves"]))
    Path(out["effective_config"]).write_text(cli.parser.dump(cli.config, skip_none=False))
    report = monitor.report(
        window=throughput.steady_window(),
        **_param_counts(cli.model),
        runtime=rt,
        epochs=cli.trainer.current_epoch,
        train_samples=throughput.samples,
        train_samples_per_s=throughput.per_second,
        steady_train_samples_per_s=throughput.steady_per_second,
        selection={
            "monitor": callback.monitor,
            "mode": callback.mode,
            "best_score": float(callback.best_model_score) if callback.best_model_score is not None else None,
            "best_checkpoint": Path(callback.best_model_path).name,
        },
        splits=facts,
        preflight=checked,
    )
    Path(out["resources"]).write_text(json.dumps(report, indent=2))


def _predict(trainer, dm, model, task: str, max_batches: int | None = None):
    """Inference over the test loader with the datamodule's normalisation applied.

    TerraTorch's `predict` writer cannot handle datamodules whose samples carry no file name
    (several of TerraTorch's dataset-specific ones), so predictions are collected here.
    """
    dm.setup("test")
    device = trainer.strategy.root_device
    model.to(device).eval()
    spec = TASKS[task]
    metrics = PinnedMetrics(task)
    preds, targets = [], []
    trainer.testing = True  # the datamodule picks its test-time augmentation from the trainer state
    try:
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            for i, batch in enumerate(dm.test_dataloader()):
                if max_batches is not None and i >= max_batches:
                    break
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch = dm.on_after_batch_transfer(batch, 0)
                output = model(batch["image"]).output
                if spec.kind == SEGMENTATION:
                    pred = output.argmax(1).to(torch.int8)
                else:
                    pred = output.squeeze(1).float()
                target = batch["mask"]
                target = target.squeeze(1) if target.ndim == 4 else target
                metrics.update(pred, target)
                preds.append(pred.cpu().numpy())
                targets.append(target.cpu().numpy().astype(np.int8 if spec.kind == SEGMENTATION else np.float32))
    finally:
        trainer.testing = False
    files = splits.dataset_files(dm.test_dataset) or []
    return metrics.compute(), np.concatenate(preds), np.concatenate(targets), files


def evaluate(config: Path, checkpoint: Path, job: dict, threads: int, out: dict) -> None:
    """Test the selected checkpoint; write every logged metric, the pinned ones and predictions."""
    rt = runtime_settings(job["trainer"], threads)
    with Monitor() as monitor:
        cli = build_cli(config, rt)
        facts = _measured_splits(cli, config, job)
        logged = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint))
        pinned, preds, targets, files = _predict(cli.trainer, cli.datamodule, cli.model, job["task"])
    np.savez_compressed(out["predictions"], pred=preds, target=targets, files=np.array(files))
    metrics = {
        "pinned": pinned,
        "terratorch": {k: float(v) for k, v in (logged[0] if logged else {}).items()},
        "test_chips": int(len(preds)),
        "splits": facts,
    }
    Path(out["metrics"]).write_text(json.dumps(metrics, indent=2))
    report = monitor.report(**_param_counts(cli.model), runtime=rt, test_samples=int(len(preds)))
    Path(out["resources"]).write_text(json.dumps(report, indent=2))


class PreflightFailed(RuntimeError):
    """A stage failed on its first batch: the cell is broken, found before any training."""


def _optimizers_and_schedulers(conf) -> list:
    """The optimizers and LR schedulers in whatever configure_optimizers returned (an optimizer,
    lists, tuples, Lightning's dicts)."""
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    if isinstance(conf, torch.optim.Optimizer | LRScheduler | ReduceLROnPlateau):
        return [conf]
    if isinstance(conf, dict):
        return [x for v in conf.values() for x in _optimizers_and_schedulers(v)]
    if isinstance(conf, list | tuple):
        return [x for v in conf for x in _optimizers_and_schedulers(v)]
    return []


def _dev_run(cli, job: dict, rt: dict, run_dir: Path) -> dict:
    """One batch each of training, validation, test and prediction with a throw-away trainer
    (Lightning's fast_dev_run), so that a broken cell fails in minutes. The model's weights, its
    modules' train/eval modes, the optimizer's and scheduler's state and the random state are put
    back afterwards: a cell trains the same with or without it (tests/test_workflow.py checks
    this; so does a SLURM array task against a plain job in tests/test_cluster.py)."""
    import copy
    import random

    import lightning.pytorch as pl

    model, dm = cli.model, cli.datamodule
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    # LightningCLI builds the config's optimizer and scheduler once and hands the same objects to
    # every fit: the check's one step would leave its moments and step count in them.
    stateful = _optimizers_and_schedulers(model.configure_optimizers())
    states = [copy.deepcopy(o.state_dict()) for o in stateful]
    # Lightning keeps each submodule's train/eval mode through fit: the prediction pass below
    # leaves them in eval mode (no dropout, frozen batch-norm statistics) unless they are put back.
    modes = {module: module.training for module in model.modules()}
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    trainer = pl.Trainer(
        accelerator=job["trainer"]["accelerator"], devices=job["trainer"]["devices"], precision=rt["precision"],
        fast_dev_run=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(run_dir / "preflight"),
    )  # fmt: skip
    stage = "fit"
    try:
        trainer.fit(model, datamodule=dm)
        stage = "test"
        trainer.test(model, datamodule=dm)
        stage = "predict"
        _, preds, _, _ = _predict(trainer, dm, model, job["task"], max_batches=1)
        if not len(preds):
            raise RuntimeError("the test split yielded no batch")
    except Exception as e:
        said = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PreflightFailed(f"{stage} stage, first batch: {type(e).__name__}: {said}") from e
    finally:
        model.load_state_dict(weights)
        for obj, state in zip(stateful, states):
            obj.load_state_dict(state)
        for module, training in modes.items():
            module.train(training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return {"stages": ["fit", "validate", "test", "predict"], "predicted": int(len(preds))}


def preflight(config: Path, run_dir: Path, job: dict, threads: int, out: Path) -> None:
    """The checks a fine-tune starts with, on their own: the splits measured, then one batch of
    every stage."""
    rt = runtime_settings(job["trainer"], threads)
    with Monitor() as monitor:
        cli = build_cli(config, rt)
        facts = _measured_splits(cli, config, job)
        checked = _dev_run(cli, job, rt, run_dir)
    out.write_text(json.dumps(monitor.report(runtime=rt, splits=facts, **checked), indent=2))
