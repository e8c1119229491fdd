"""Hyperparameter search: Optuna's distributed pattern, W worker jobs against one shared storage.

Each worker (`run_worker`) runs trials until the study holds N finished (complete or pruned)
trials. A trial is one fine-tune of the cell's rendered config with the sampled parameters set at
their config paths, scored on the selection split (the metric the config's ModelCheckpoint
monitors), never on the reported split: the datamodule's test and predict loaders are refused
and the files the trial can read are checked against the reported split before training.

Storage (`open_study`): a journal file on the shared filesystem (default, no server) or an RDB
URL (`postgresql://...`, `sqlite:///...`). Both detect a worker killed mid-trial (SIGKILL, OOM,
scheduler kill) through Optuna's heartbeat: a RUNNING trial whose heartbeat is older than the
grace period is failed by the next worker that starts a trial (`fail_stale_trials`), and
`RetryHeartbeatStaleTrialCallback` queues a copy with the same parameters, which the next
`study.ask()` runs. RDBStorage has the heartbeat built in; Optuna 5.0's JournalStorage has
none, so `HeartbeatJournalStorage` adds it (the last beat is a trial system attr written
through the journal itself).
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from geofm.config import OVERRIDE_PATHS
from geofm.render import set_path

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_KEY = "geofm:heartbeat"  # journal storage: time.time() of a running trial's last beat
HEARTBEAT = {"interval": 60, "grace_period": 180, "max_retry": 3}  # seconds; retries per stale trial

# GEO-Bench-2's searched settings: learning rate (log-uniform), batch size, weight decay, frozen or
# full fine-tuning. The ranges cover the values of the leaderboard's example submission; a task's
# space and a model's overrides replace entries whole (`merge_space`).
DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "weight_decay": {"type": "float", "low": 1.0e-3, "high": 0.4, "log": True},
    "freeze_backbone": {"type": "categorical", "choices": [False, True]},
}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
SAMPLER_DEFAULTS = {"tpe": {"constant_liar": True}}  # concurrent workers avoid each other's running points
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


class SearchError(ValueError):
    """A search setting that cannot work, phrased as '<key>: <problem>; fix: <what to do>'."""


class ReportedSplitRead(RuntimeError):
    """A trial asked for the reported split (test or predict loader)."""


class SurplusTrial(RuntimeError):
    """The study's budget was already taken by earlier trials when this one started."""


# ---------------------------------------------------------------------------------- storage
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with the heartbeat RDBStorage has: the same constructor arguments and the
    same staleness rule (no beat for `grace_period` seconds, default 2 x interval).

    A beat is the trial system attr HEARTBEAT_KEY = time.time(), appended to the journal by the
    worker's heartbeat thread. A running trial's last beat is the later of that attr and its start
    (a retried trial inherits its predecessor's system attrs, old beat included). Clocks of the
    hosts sharing the journal must agree to well within the grace period (NTP does this).
    """

    def __init__(self, backend, heartbeat_interval=None, grace_period=None, heartbeat_stale_trial_callback=None):
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive number of seconds")
        if grace_period is not None and grace_period <= 0:
            raise ValueError("grace_period must be a positive number of seconds")
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            if not self.get_trial(trial_id).state.is_finished():
                self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:
            pass  # another worker failed it as stale in between: nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * self.heartbeat_interval
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            if now - max(trial.system_attrs.get(HEARTBEAT_KEY, 0.0), started) > grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback


def make_storage(storage: str, heartbeat: dict | None = None):
    """An RDB URL (contains '://') or the path of a journal file (created with its folder)."""
    hb = {**HEARTBEAT, **(heartbeat or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat arguments are "experimental"
        kwargs = {
            "heartbeat_interval": hb["interval"],
            "grace_period": hb["grace_period"],
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=hb["max_retry"]),
        }
        if "://" in storage:
            return _rdb_storage(storage, kwargs)
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(storage)), **kwargs)


def _rdb_storage(url: str, kwargs: dict, attempts: int = 5) -> RDBStorage:
    """RDBStorage, retried: W workers starting together race to create its tables (PostgreSQL
    then refuses all but one with a duplicate-key error)."""
    import sqlalchemy.exc

    engine = {} if url.startswith("sqlite") else {"pool_pre_ping": True}  # long trials: stale connections
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs=engine, **kwargs)
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def make_sampler(cfg: dict | None = None, worker: int = 0, started: int = 0):
    """TPE by default, seeded from (seed, worker, started): `started` is the number of trials the
    study held when this worker opened it. Workers sharing one seed would propose the same first
    points, and so would a re-run worker repeat the points of the worker it replaces (TPE samples
    its first trials at random). Given the same history, the proposals are reproducible."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", "tpe")
    if name not in SAMPLERS:
        raise SearchError(f"hpo.sampler.name: unknown sampler {name!r}; fix: use one of {', '.join(SAMPLERS)}")
    seed = cfg.pop("seed", 0)
    if seed is not None:
        seed = int(np.random.SeedSequence([seed, worker, started]).generate_state(1)[0])
    return SAMPLERS[name](seed=seed, **{**SAMPLER_DEFAULTS.get(name, {}), **cfg})


def make_pruner(cfg: dict | None = None):
    cfg = dict(cfg or {"name": "median"})
    name = cfg.pop("name", "median")
    if name not in PRUNERS:
        raise SearchError(f"hpo.pruner.name: unknown pruner {name!r}; fix: use one of {', '.join(PRUNERS)}")
    return PRUNERS[name](**cfg)


def direction_of(mode: str) -> str:
    """'max'/'min' (a task's selection_mode) or Optuna's own words."""
    words = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}
    if mode not in words:
        raise SearchError(f"direction: {mode!r}; fix: use max or min")
    return words[mode]


def open_study(
    name: str,
    storage: str,
    direction: str,
    sampler_cfg: dict | None = None,
    pruner_cfg: dict | None = None,
    heartbeat: dict | None = None,
    worker: int = 0,
) -> optuna.Study:
    """Create the study or load it (concurrent workers may race to create it: both get it)."""
    wanted = direction_of(direction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study = optuna.create_study(
            study_name=name,
            storage=make_storage(storage, heartbeat),
            direction=wanted,
            sampler=optuna.samplers.RandomSampler(),  # replaced below, once the history is known
            pruner=make_pruner(pruner_cfg),
            load_if_exists=True,
        )
        study.sampler = make_sampler(sampler_cfg, worker, started=len(study_trials(study)))
    if study.direction.name.lower() != wanted:
        raise SearchError(
            f"hpo: study {name!r} in {storage} was created to {study.direction.name.lower()}, not to {wanted}; "
            "fix: give the study another name or delete the old one"
        )
    return study


def load_study(name: str, storage: str, heartbeat: dict | None = None) -> optuna.Study:
    """An existing study, to read (hpo_best, the report); KeyError when there is none."""
    return optuna.load_study(study_name=name, storage=make_storage(storage, heartbeat))


# ---------------------------------------------------------------------------------- search space
def merge_space(*layers: dict | None) -> dict:
    """The search space from layers (default, then the task's, then the model's): a parameter's
    entry in a later layer replaces the earlier one whole; an entry `null` removes it."""
    space: dict = {}
    for layer in layers:
        for name, entry in (layer or {}).items():
            if entry is None:
                space.pop(name, None)
            else:
                space[name] = dict(entry)
    check_space(space)
    return space


def check_space(space: dict) -> None:
    for name, entry in space.items():
        key = f"hpo.space.{name}"
        if name not in OVERRIDE_PATHS and not entry.get("path"):
            raise SearchError(
                f"{key}: no config path known for {name!r}; fix: add path: <dotted config key> "
                f"or use one of {', '.join(OVERRIDE_PATHS)}"
            )
        kind = entry.get("type")
        if kind == "categorical":
            if not entry.get("choices"):
                raise SearchError(f"{key}: categorical without choices; fix: list the choices")
        elif kind in ("float", "int"):
            if "low" not in entry or "high" not in entry or not entry["low"] <= entry["high"]:
                raise SearchError(f"{key}: needs low <= high; fix: give both bounds")
            if entry.get("log") and entry["low"] <= 0:
                raise SearchError(f"{key}: a log scale needs low > 0; fix: raise low or drop log")
        else:
            raise SearchError(f"{key}: type {kind!r}; fix: use float, int or categorical")


def suggest(trial: optuna.Trial, space: dict) -> dict:
    params = {}
    for name, entry in space.items():
        if entry["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, entry["choices"])
        elif entry["type"] == "int":
            params[name] = trial.suggest_int(
                name, entry["low"], entry["high"], step=entry.get("step", 1), log=entry.get("log", False)
            )
        else:
            params[name] = trial.suggest_float(
                name, entry["low"], entry["high"], step=entry.get("step"), log=entry.get("log", False)
            )
    return params


def apply_params(config: dict, params: dict, space: dict | None = None) -> dict:
    """A copy of a rendered config with each parameter set at its path (OVERRIDE_PATHS or the
    space entry's `path`). Also how the best parameters reach the seed cells' overrides."""
    out = json.loads(json.dumps(config))
    for name, value in params.items():
        set_path(out, ((space or {}).get(name) or {}).get("path") or OVERRIDE_PATHS[name], value)
    return out


def as_overrides(params: dict, space: dict | None = None) -> dict:
    """Best parameters as a cell's `overrides` (geofm.config.cell_settings): OVERRIDE_PATHS names
    as they are, parameters with their own config path under 'set'."""
    out: dict = {}
    for name, value in params.items():
        path = ((space or {}).get(name) or {}).get("path")
        if path:
            out.setdefault("set", {})[path] = value
        else:
            out[name] = value
    return out


def _rebase(node, old: str, new: str):
    """Every string that is `old` or a path under it, moved under `new` (a trial's own run dir)."""
    if isinstance(node, dict):
        return {k: _rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old.rstrip("/")) :]
    return node


# ---------------------------------------------------------------------------------- one trial
def _guard_reported_split(cli, config_path: Path, job: dict) -> dict:
    """Refuse the reported split: measure the splits (a selection split shared with the reported
    one is refused whatever the task allows), check that no file the trial's train and selection
    loaders serve is a reported file, and make the test and predict loaders raise."""
    from geofm import splits, training

    facts = training._measured_splits(cli, config_path, {**job, "allow_selection_on_reported_split": False})
    dm = cli.datamodule
    reported = set(splits.dataset_files(getattr(dm, "test_dataset", None)) or [])
    served = set()
    for name in ("train_dataset", "val_dataset"):
        served |= set(splits.dataset_files(getattr(dm, name, None)) or [])
    overlap = len(served & reported)
    if overlap:
        raise splits.SplitLeak(
            f"tasks.{job['task']}: {overlap} files a trial would train or select on are in the reported split; "
            "fix: make the training and selection splits disjoint from the test split"
        )
    return {"splits": facts, "served_files_in_reported_split": overlap, "requested": refuse_reported_loaders(dm)}


def refuse_reported_loaders(datamodule) -> list[str]:
    """Make the datamodule's test and predict loaders raise ReportedSplitRead; the returned list
    names each one asked for (recorded in the trial's user attrs)."""
    requested: list[str] = []
    for stage in ("test", "predict"):

        def refuse(*args, _stage=stage, **kwargs):
            requested.append(_stage)
            raise ReportedSplitRead(f"a trial asked for the {_stage} loader: trials are scored on the selection split")

        setattr(datamodule, f"{stage}_dataloader", refuse)
    return requested


def _record(trial: optuna.Trial, monitor, guard: dict | None, trainer, pruned: bool) -> None:
    report = monitor.report()
    gpu = report.get("gpu") or {}
    attrs = {
        "wall_s": report["wall_s"],
        "cpu_hours": report["cpu_hours"],
        "gpu_hours": gpu.get("gpu_hours"),
        "device": gpu.get("name") or "cpu",
        "peak_rss_mb": report["peak_rss_mb"],
        # Pruning stops a trial in its epoch's validation (current_epoch is that epoch, 0-based).
        "epochs": trainer.current_epoch + int(pruned) if trainer is not None else None,
        "pruned_at_epoch": trainer.current_epoch if pruned and trainer is not None else None,
    }
    if guard is not None:
        attrs["reported_split_loaders_requested"] = len(guard["requested"])
        attrs["served_files_in_reported_split"] = guard["served_files_in_reported_split"]
    _set_attrs(trial, attrs)


def _set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    """User attrs of a trial that another worker may have failed as stale meanwhile (then they
    cannot be written, and the trial's retry records its own)."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        pass


def check_budget(trial: optuna.Trial, n_trials: int) -> None:
    """Raise SurplusTrial when `n_trials` trials numbered before this one are finished or running:
    two workers that both saw a free slot started a trial each (the later one gives way)."""
    earlier = study_trials(trial.study, (*FINISHED, TrialState.RUNNING))
    if sum(t.number < trial.number for t in earlier) >= n_trials:
        _set_attrs(trial, {"surplus": True})
        raise SurplusTrial(f"{n_trials} earlier trials already fill the budget (a concurrent worker started one)")


def objective(
    trial: optuna.Trial,
    base: dict,
    job: dict,
    space: dict,
    trials_dir: Path,
    n_trials: int,
    threads: int,
    keep_checkpoints: bool = False,
    current: dict | None = None,
) -> float:
    """One trial: the sampled parameters in the cell's config, a fit with Optuna's Lightning
    pruning callback on the selection metric, the best selection score as the value."""
    from optuna_integration import PyTorchLightningPruningCallback

    from geofm import training
    from geofm.usage import Monitor

    if current is not None:
        current["trial_id"] = trial._trial_id
    check_budget(trial, n_trials)
    retried = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")  # set by the retry callback
    params = suggest(trial, space)
    run_dir = Path(trials_dir) / f"trial{trial.number:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = apply_params(_rebase(base, base["trainer"]["default_root_dir"], str(run_dir)), params, space)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    _set_attrs(trial, {"run_dir": str(run_dir)})
    if retried is not None:
        _set_attrs(trial, {"retry_of": retried})
    rt = training.runtime_settings(job["trainer"], threads)
    monitor, cli, guard, pruned = Monitor(), None, None, False
    try:
        with monitor:
            cli = training.build_cli(config_path, rt, job=job)
            callback = training._selection_callback(cli.trainer)
            if callback is None:
                raise RuntimeError("the config has no ModelCheckpoint with a monitor: nothing to score a trial on")
            if direction_of(callback.mode) != trial.study.direction.name.lower():
                raise SearchError(
                    f"hpo: the study is to {trial.study.direction.name.lower()} but {callback.monitor} is selected "
                    f"with mode {callback.mode}; fix: open the study with direction {callback.mode}"
                )
            _set_attrs(trial, {"monitor": callback.monitor})
            guard = _guard_reported_split(cli, config_path, job)
            _set_attrs(trial, {"splits": guard["splits"]})
            cli.trainer.callbacks.append(PyTorchLightningPruningCallback(trial, callback.monitor))
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if callback.best_model_score is None:
                raise RuntimeError(
                    f"{callback.monitor} was never logged: no validation ran (a training split with fewer "
                    "chips than batch_size yields no batch when the loader drops the last one)"
                )
            value = float(callback.best_model_score)
    except optuna.TrialPruned:
        pruned = True
        raise
    except Exception as e:
        _set_attrs(trial, {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        raise
    finally:
        _record(trial, monitor, guard, cli.trainer if cli else None, pruned)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        cli = None
        _release_memory()
    return value


def _release_memory() -> None:
    """A finished trial's model, trainer and optimizer, freed now (Lightning's objects hold
    reference cycles) rather than at the next full collection (~1 s with TerraTorch loaded)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------- workers
def study_trials(study: optuna.Study, states=None) -> list:
    return study.get_trials(deepcopy=False, states=states)


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state name, e.g. {'COMPLETE': 3, 'PRUNED': 1, 'FAIL': 1}."""
    return dict(Counter(t.state.name for t in study_trials(study)))


def n_finished(study: optuna.Study) -> int:
    return len(study_trials(study, FINISHED))


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class _Budget:
    """After each trial: stop this worker when finished + running trials fill the budget (the
    running ones are other workers'), or after `max_failures` trials in a row failed here."""

    def __init__(self, n_trials: int, max_failures: int) -> None:
        self.n_trials, self.max_failures = n_trials, max_failures
        self.failures: list[str] = []
        self.ran: list[int] = []

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran.append(trial.number)
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            self.failures.append(f"trial {trial.number}: {trial.user_attrs.get('error', 'failed')}")
        elif trial.state in FINISHED:
            self.failures.clear()
        live = len(study_trials(study, (*FINISHED, TrialState.RUNNING)))
        if live >= self.n_trials or len(self.failures) >= self.max_failures:
            study.stop()


def run_worker(
    study: optuna.Study,
    config: Path | str,
    job: dict,
    space: dict,
    n_trials: int,
    trials_dir: Path | str,
    threads: int = 1,
    poll_s: float | None = None,
    max_failures: int = 3,
    keep_checkpoints: bool = False,
) -> dict:
    """Run trials until the study holds `n_trials` finished (complete or pruned) trials.

    config: the cell's rendered TerraTorch config (as the finetune rule renders it); job: the dict the
    training functions take; trials_dir: each trial runs in trials_dir/trial<NNNN>. When the
    running trials of other workers would fill the budget, this worker waits for them, polling
    every `poll_s` seconds (default: the heartbeat interval) and failing stale ones, so that a
    trial lost with its worker is re-run here. Raises RuntimeError after `max_failures` failed
    trials in a row. Returns what this worker ran and the study's state counts.
    """
    check_space(space)
    base = yaml.safe_load(Path(config).read_text())
    current: dict = {}  # the trial this worker runs (its storage id)
    func = partial(
        objective,
        base=base,
        job=job,
        space=space,
        trials_dir=Path(trials_dir),
        n_trials=n_trials,
        threads=threads,
        keep_checkpoints=keep_checkpoints,
        current=current,
    )
    budget = _Budget(n_trials, max_failures)
    poll = poll_s or study._storage.get_heartbeat_interval() or 5
    while n_finished(study) < n_trials:
        if len(budget.failures) >= max_failures:
            raise RuntimeError(f"{max_failures} trials failed in a row here: " + "; ".join(budget.failures))
        if len(study_trials(study, (*FINISHED, TrialState.RUNNING))) >= n_trials:
            _fail_stale(study)  # a stale trial goes FAIL and its retry WAITING: the budget opens again
            time.sleep(poll)
            continue
        try:
            study.optimize(
                func,
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), budget],
                catch=(Exception,),
                gc_after_trial=False,  # the objective collects once, before freeing GPU memory
            )
        except (ValueError, AssertionError, UpdateFinishedTrialError) as e:
            # Optuna could not record this worker's trial because another worker had failed it
            # as stale (its heartbeat came later than the grace period): the retry re-runs it.
            # (Optuna 5.0 raises ValueError, or AssertionError when the objective returned a value.)
            lost = current.get("trial_id")
            if lost is None or study._storage.get_trial(lost).state != TrialState.FAIL:
                raise
            optuna.logging.get_logger("optuna").warning(f"trial {lost} was failed as stale while it ran here: {e}")
    return {"ran": budget.ran, "finished": n_finished(study), "counts": counts(study)}


def run_from_spec(spec: dict) -> dict:
    """open_study + run_worker from one JSON-able dict (what `python -m geofm.hpo spec.json` and
    the hpo_worker rule run): study, storage, direction, sampler, pruner, heartbeat, worker,
    config, job, space, n_trials, trials_dir, threads."""
    study = open_study(
        spec["study"],
        spec["storage"],
        spec["direction"],
        spec.get("sampler"),
        spec.get("pruner"),
        spec.get("heartbeat"),
        spec.get("worker", 0),
    )
    return run_worker(
        study,
        spec["config"],
        spec["job"],
        spec["space"],
        spec["n_trials"],
        spec["trials_dir"],
        threads=spec.get("threads", 1),
        poll_s=spec.get("poll_s"),
    )


# ---------------------------------------------------------------------------------- results
def best(study: optuna.Study) -> dict:
    """The best complete trial: params, value, number, and the study's trials by state."""
    trial = study.best_trial  # ValueError when no trial completed
    return {
        "params": trial.params,
        "value": trial.value,
        "number": trial.number,
        "direction": study.direction.name.lower(),
        "monitor": trial.user_attrs.get("monitor"),
        "finished": n_finished(study),
        "counts": counts(study),
    }


def trials_table(study: optuna.Study) -> list[dict]:
    """One row per trial (CSV-ready): number, state, value, one param_<name> column per
    parameter, wall time, CPU- and GPU-hours, epochs run, the epoch it was pruned at, and notes
    (retry of a lost trial, surplus, error)."""
    trials = study_trials(study)
    names = sorted({name for t in trials for name in t.params})
    rows = []
    for t in trials:
        a = t.user_attrs
        notes = [f"retry of trial {a['retry_of']}"] if a.get("retry_of") is not None else []
        if a.get("surplus"):
            notes.append("surplus: the budget was full when it started")
        elif a.get("error"):
            notes.append(a["error"])
        elif t.state == TrialState.FAIL:  # failed without an error of its own: failed as stale
            notes.append("worker lost (heartbeat stale)")
        note = "; ".join(notes)
        rows.append({
            "number": t.number, "state": t.state.name, "value": t.value,
            **{f"param_{n}": t.params.get(n) for n in names},
            "wall_s": a.get("wall_s"), "cpu_hours": a.get("cpu_hours"), "gpu_hours": a.get("gpu_hours"),
            "epochs": a.get("epochs"), "pruned_at_epoch": a.get("pruned_at_epoch"), "note": note,
        })  # fmt: skip
    return rows


def cost(study: optuna.Study) -> dict:
    """The study's total resources (every trial that recorded them, failed ones included), for
    the cost ledger's line beside the seeds' total. A trial lost with its worker recorded none."""
    trials = study_trials(study)

    def total(key):
        values = [t.user_attrs[key] for t in trials if t.user_attrs.get(key) is not None]
        return round(sum(values), 6) if values else None

    return {
        "trials": len(trials),
        "finished": n_finished(study),
        "wall_s": total("wall_s"),
        "cpu_hours": total("cpu_hours"),
        "gpu_hours": total("gpu_hours"),
    }


def plots(study: optuna.Study, out_dir: Path | str) -> dict[str, str]:
    """Optuna's matplotlib optimisation history and parameter importances (fANOVA, which needs
    scikit-learn) as PNG files; a figure that cannot be drawn yet (fewer than two complete
    trials, or no parameter varied) is a PNG that says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"history": out_dir / "optimization_history.png", "importances": out_dir / "param_importances.png"}
    vis = optuna.visualization.matplotlib
    monitors = {t.user_attrs.get("monitor") for t in study_trials(study)} - {None}
    target = monitors.pop() if len(monitors) == 1 else "Objective Value"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, draw in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances)):
            try:
                ax = draw(study, target_name=target)
                fig = ax.figure
            except (ValueError, RuntimeError) as e:  # too few trials for importances
                fig, ax = plt.subplots(figsize=(6, 2))
                ax.axis("off")
                ax.text(0.5, 0.5, f"{name}: not available yet ({e})", ha="center", va="center", wrap=True)
            fig.set_size_inches(7, 4.5)
            fig.savefig(paths[name], dpi=100, bbox_inches="tight")
            plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":  # python -m geofm.hpo spec.json: one worker (tests, or by hand)
    print(json.dumps(run_from_spec(json.loads(Path(sys.argv[1]).read_text()))))
