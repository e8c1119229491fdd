"""Hyperparameter search on sample data with tiny trials (prithvi_eo_tiny, random init, 1 epoch,
4 trials, 2 worker processes): the study ends with exactly 4 finished trials; workers killed
with SIGKILL mid-trial, then re-run, complete it without repeating a finished trial, on the
journal file and on a real PostgreSQL; no trial read the reported split; the best parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import CPU, REPO, render_for_sample

from geofm import hpo, sample_data
from geofm.tasks import TASKS

TASK = "landslide"  # the smallest chips (128 px)
N_TRIALS, WORKERS = 4, 2
HEARTBEAT = {"interval": 1, "grace_period": 5, "max_retry": 3}
COUNTS = {"train": 4, "validation": 2, "test": 2}  # chips per split: one or two steps per epoch
# GEO-Bench-2's space with batch sizes that fit 4 training chips (the loader drops a short batch).
SPACE = hpo.merge_space(hpo.DEFAULT_SPACE, {"batch_size": {"type": "categorical", "choices": [2, 4]}})
RUNNING = optuna.trial.TrialState.RUNNING


# ---------------------------------------------------------------------------------- no training
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_whose_heartbeat_stops_is_failed_and_retried_with_its_params(kind, tmp_path):
    storage = str(tmp_path / "s.journal") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    study = hpo.open_study("hb", storage, "max", heartbeat={"interval": 1, "grace_period": 1, "max_retry": 3})
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    study._storage.record_heartbeat(trial._trial_id)
    assert study._storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(2.2)  # no beat for longer than the grace period: the worker is gone
    hpo._fail_stale(study)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "FAIL", 1: "WAITING"}
    retry = study.get_trials()[1]
    assert retry.params == {"lr": lr} and retry.system_attrs["failed_trial"] == 0
    hpo._fail_stale(study)  # a second worker checking again fails and queues nothing more
    assert len(study.get_trials()) == 2


def test_space_layers_and_config_paths():
    space = hpo.merge_space(
        hpo.DEFAULT_SPACE,
        {"batch_size": {"type": "categorical", "choices": [2, 4]}},
        {"freeze_backbone": None, "head_dropout": {"type": "float", "low": 0.0, "high": 0.5,
                                                   "path": "model.init_args.model_args.head_dropout"}},
    )  # fmt: skip
    assert set(space) == {"lr", "batch_size", "weight_decay", "head_dropout"}
    assert space["batch_size"]["choices"] == [2, 4] and space["lr"] == hpo.DEFAULT_SPACE["lr"]
    config = yaml.safe_load(TASKS[TASK].recipe.read_text())
    out = hpo.apply_params(config, {"lr": 1e-4, "batch_size": 4, "head_dropout": 0.2}, space)
    assert out["optimizer"]["init_args"]["lr"] == 1e-4 and out["data"]["init_args"]["batch_size"] == 4
    assert out["model"]["init_args"]["model_args"]["head_dropout"] == 0.2
    assert config["data"]["init_args"]["batch_size"] == 8  # the input is not changed
    assert hpo.as_overrides({"lr": 1e-4, "head_dropout": 0.2}, space) == {
        "lr": 1e-4, "set": {"model.init_args.model_args.head_dropout": 0.2}}  # fmt: skip
    with pytest.raises(hpo.SearchError, match="fix: add path"):
        hpo.merge_space({"dropout": {"type": "float", "low": 0, "high": 1}})
    with pytest.raises(hpo.SearchError, match="log scale"):
        hpo.merge_space({"lr": {"type": "float", "low": 0, "high": 1, "log": True}})


def test_workers_seed_their_samplers_apart_and_reproducibly():
    def first(worker, started=0):
        study = optuna.create_study(sampler=hpo.make_sampler({"name": "tpe", "seed": 3}, worker, started))
        return study.ask().suggest_float("lr", 1e-5, 1e-3, log=True)

    assert first(0) == first(0) and first(0) != first(1)
    assert first(0, started=2) != first(0)  # a re-run worker does not repeat its predecessor's points


def test_a_trial_started_when_the_budget_is_full_gives_way():
    study = optuna.create_study()
    first, second = study.ask(), study.ask()  # two workers saw one free slot of a budget of 1
    hpo.check_budget(first, 1)
    with pytest.raises(hpo.SurplusTrial):
        hpo.check_budget(second, 1)
    assert study.get_trials()[1].user_attrs == {"surplus": True}


def test_a_worker_whose_trial_was_failed_as_stale_meanwhile_carries_on(tmp_path, monkeypatch):
    """Another worker failed this worker's running trial (its heartbeat came late): Optuna cannot
    record the result; the worker goes on and the study still ends with the requested count."""
    calls = []

    def fake_objective(trial, current, **_):
        current["trial_id"] = trial._trial_id
        calls.append(trial.number)
        if len(calls) == 1:
            trial.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return float(len(calls))

    monkeypatch.setattr(hpo, "objective", fake_objective)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path / "run")}}))
    study = hpo.open_study("late", str(tmp_path / "s.journal"), "max", heartbeat=HEARTBEAT)
    result = hpo.run_worker(study, config, {}, {"lr": hpo.DEFAULT_SPACE["lr"]}, 2, tmp_path / "trials")
    assert result["counts"] == {"FAIL": 1, "COMPLETE": 2} and calls == [0, 1, 2]


def test_the_reported_split_loaders_refuse_and_are_recorded():
    class DataModule:
        def test_dataloader(self):
            return ["a reported chip"]

    dm = DataModule()
    requested = hpo.refuse_reported_loaders(dm)
    with pytest.raises(hpo.ReportedSplitRead):
        dm.test_dataloader()
    with pytest.raises(hpo.ReportedSplitRead):
        dm.predict_dataloader()
    assert requested == ["test", "predict"]


# ---------------------------------------------------------------------------------- tiny studies
@pytest.fixture(scope="module")
def cell(tmp_path_factory, shared_cache):
    """The rendered config of one landslide cell on a small sample (as the finetune rule writes it)."""
    work = tmp_path_factory.mktemp("hpo_cell")
    data = work / "data"
    sample_data.write(TASK, data, seed=0, counts=COUNTS)
    config = render_for_sample(TASKS[TASK], TASKS[TASK].recipe.read_text(), data, work, shared_cache)
    job = {"task": TASK, "trainer": CPU, "data_root": str(data), "splits_dir": str(work / "splits"),
           "allow_selection_on_reported_split": False}  # fmt: skip
    return config, job


def _start_worker(cell, storage: str, work: Path, worker: int, phase: str) -> subprocess.Popen:
    config, job = cell
    spec = {
        "study": "tiny", "storage": storage, "direction": TASKS[TASK].selection_mode,
        "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"}, "heartbeat": HEARTBEAT,
        "worker": worker, "config": str(config), "job": job, "space": SPACE, "n_trials": N_TRIALS,
        "trials_dir": str(work / "trials"), "threads": 1,
    }  # fmt: skip
    path = work / f"{phase}-worker{worker}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1"}
    with open(work / f"{phase}-worker{worker}.out", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "geofm.hpo", str(path)], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _tail(work: Path, phase: str) -> str:
    return "\n".join(
        f"--- worker {w}:\n" + "\n".join((work / f"{phase}-worker{w}.out").read_text().splitlines()[-30:])
        for w in range(WORKERS)
    )


def _kill_and_resume(cell, storage: str, work: Path) -> dict:
    """Two workers; SIGKILL both once a trial has finished and another is fitting; then two
    fresh workers (the re-run) finish the study."""
    watch = None
    t0 = time.perf_counter()
    procs = [_start_worker(cell, storage, work, w, "first") for w in range(WORKERS)]
    deadline = time.monotonic() + 420
    try:
        while True:
            assert time.monotonic() < deadline, "no trial reached fit in time\n" + _tail(work, "first")
            if watch is None:
                try:
                    watch = optuna.load_study(study_name="tiny", storage=hpo.make_storage(storage, HEARTBEAT))
                except KeyError:  # not created yet
                    time.sleep(0.5)
                    continue
            trials = watch.get_trials(deepcopy=False)
            fitting = [t for t in trials if t.state == RUNNING and "splits" in t.user_attrs]
            if sum(t.state in hpo.FINISHED for t in trials) >= 1 and fitting:
                break
            assert all(p.poll() is None for p in procs), "a worker ended early\n" + _tail(work, "first")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # the scheduler's kill: no cleanup, no tell
            p.wait(30)
    first_s = time.perf_counter() - t0
    before = {t.number: (t.state, t.value, t.params) for t in watch.get_trials() if t.state in hpo.FINISHED}
    killed = [t.number for t in watch.get_trials() if t.state == RUNNING]
    t0 = time.perf_counter()
    procs = [_start_worker(cell, storage, work, w, "rerun") for w in range(WORKERS)]
    try:
        for p in procs:
            p.wait(600)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(30)
    assert all(p.returncode == 0 for p in procs), _tail(work, "rerun")
    ran = [json.loads((work / f"rerun-worker{w}.out").read_text().splitlines()[-1])["ran"] for w in range(WORKERS)]
    study = optuna.load_study(study_name="tiny", storage=hpo.make_storage(storage, HEARTBEAT))
    return {"study": study, "before": before, "killed": killed, "ran": ran, "work": work,
            "first_s": first_s, "rerun_s": time.perf_counter() - t0}  # fmt: skip


def _check_resumed(run: dict) -> None:
    study, before, killed = run["study"], run["before"], run["killed"]
    trials = study.get_trials()
    finished = [t for t in trials if t.state in hpo.FINISHED]
    assert len(finished) == N_TRIALS, hpo.counts(study)
    assert before and killed, "the kill did not land mid-trial"
    # Trials finished before the kill are kept as they were and were not run again.
    for number, (state, value, params) in before.items():
        t = trials[number]
        assert (t.state, t.value, t.params) == (state, value, params)
    rerun = {n for ran in run["ran"] for n in ran}
    assert not rerun & set(before), f"re-run repeated finished trials {rerun & set(before)}"
    points = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(points)) == len(points), "a parameter point was trained twice"
    # Each killed trial is failed (heartbeat stale) and re-run once with the same parameters.
    for number in killed:
        assert trials[number].state.name == "FAIL" and "error" not in trials[number].user_attrs
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert len(retries) == 1 and retries[0].params == trials[number].params
        assert retries[0].state in hpo.FINISHED and retries[0].user_attrs["retry_of"] == number
    # Nothing else failed except a surplus trial (two workers racing for the last slot).
    others = [t for t in trials if t.state.name not in ("COMPLETE", "PRUNED") and t.number not in killed]
    assert all(t.user_attrs.get("surplus") or t.state.name == "WAITING" for t in others), hpo.trials_table(study)
    # Each finished trial trained its own parameters, in its own folder, scored on the selection split.
    for t in finished:
        config = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert config["optimizer"]["init_args"]["lr"] == t.params["lr"]
        assert config["optimizer"]["init_args"]["weight_decay"] == t.params["weight_decay"]
        assert config["data"]["init_args"]["batch_size"] == t.params["batch_size"]
        assert config["model"]["init_args"]["freeze_backbone"] == t.params["freeze_backbone"]
        assert config["trainer"]["default_root_dir"] == t.user_attrs["run_dir"]
        assert t.user_attrs["monitor"] == TASKS[TASK].selection_metric
        assert t.intermediate_values == {0: pytest.approx(t.value)}  # reported by the pruning callback
        assert t.user_attrs["wall_s"] > 0 and t.user_attrs["cpu_hours"] > 0 and t.user_attrs["epochs"] == 1


def test_a_killed_search_resumes_on_the_journal_file_without_repeating_finished_trials(journal_run):
    _check_resumed(journal_run)


def test_a_killed_search_resumes_on_postgresql_without_repeating_finished_trials(cell, tmp_path):
    from postgres import Postgres

    pg = Postgres().start()
    try:
        _check_resumed(_kill_and_resume(cell, pg.url, tmp_path))
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def journal_run(cell, tmp_path_factory):
    work = tmp_path_factory.mktemp("hpo_journal")
    run = _kill_and_resume(cell, str(work / "study.journal"), work)
    print(f"tiny study: first phase {run['first_s']:.1f} s, re-run {run['rerun_s']:.1f} s")
    return run


def test_no_trial_read_the_reported_split(journal_run):
    task = TASKS[TASK]
    measured = [t for t in journal_run["study"].get_trials() if "splits" in t.user_attrs]
    assert len(measured) >= N_TRIALS
    for t in measured:
        facts = t.user_attrs["splits"]
        assert facts["selection"]["label"] == task.selection_split and facts["test"]["label"] == task.test_split
        assert facts["shared_selection_test"] == 0 and not facts["leaky"] and facts["test"]["chips"] > 0
        if "wall_s" in t.user_attrs:  # recorded when the trial ended (not for a killed one)
            assert t.user_attrs["reported_split_loaders_requested"] == 0
            assert t.user_attrs["served_files_in_reported_split"] == 0


def test_best_parameters_trials_table_cost_and_plots(journal_run, tmp_path):
    study = journal_run["study"]
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    top = max(t.value for t in complete)  # landslide selects on val/mIoU, higher is better
    result = hpo.best(study)
    chosen = study.get_trials()[result["number"]]
    assert result["value"] == top and chosen.state.name == "COMPLETE" and chosen.value == top
    assert result["params"] == chosen.params and set(result["params"]) == set(SPACE)
    assert result["finished"] == N_TRIALS and result["direction"] == "maximize"
    assert sum(result["counts"].get(s, 0) for s in ("COMPLETE", "PRUNED")) == N_TRIALS
    table = hpo.trials_table(study)
    assert [r["number"] for r in table] == [t.number for t in study.get_trials()]
    assert {"param_lr", "param_batch_size", "param_weight_decay", "param_freeze_backbone"} <= set(table[0])
    lost = [r for r in table if r["number"] in journal_run["killed"]]
    assert all("worker lost" in r["note"] for r in lost)
    cost = hpo.cost(study)
    assert cost["wall_s"] >= sum(t.user_attrs["wall_s"] for t in complete) and cost["gpu_hours"] is None
    paths = hpo.plots(study, tmp_path / "plots")
    for path in paths.values():
        assert Path(path).stat().st_size > 10_000  # a drawn figure, not the 'not available' note
