"""Cluster execution through profiles/slurm and profiles/lsf, on the real one-node SLURM test
cluster (tests/cluster/slurm-up.sh; sacct works). LSF runs through the LSF stand-in
(tests/lsf-standin), which maps LSF's commands onto the same SLURM cluster.

The test cluster has no GPUs and 2 CPUs. Runs that must execute set the profile's site block
through its environment variables (GEOFM_SLURM_GPUS=0, GEOFM_SLURM_CPUS=1, ...) as a user of a
CPU-only cluster would; what a GPU user gets is checked by a dry run and by a real submission
that asks this GPU-less cluster for a GPU.

To fit the machine, the runs start together in the background when the module starts (the
cluster runs two jobs at a time either way) while the local reference run (conftest's
default_run) and the quick checks run; each fixture then waits for its run. Every snakemake call
has a hard `timeout -k`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, VENV_BIN, job_counts, write_config
from PIL import Image

pytestmark = pytest.mark.slurm

HEAVY = ("finetune", "evaluate")
TASKS = ("crop", "landslide", "biomass")
STANDIN = REPO / "tests" / "lsf-standin" / "bin"
SLURM_SITE = {
    "GEOFM_SLURM_PARTITION": "debug",
    "GEOFM_SLURM_ACCOUNT": "geofm",
    "GEOFM_SLURM_GPUS": "0",  # the test cluster has no GPUs
    "GEOFM_SLURM_CPUS": "1",
}
LSF_SITE = {
    "GEOFM_LSF_QUEUE": "debug",
    "GEOFM_LSF_PROJECT": "geofm",
    "GEOFM_LSF_GPUS": "0",
    "GEOFM_LSF_CPUS": "1",
    "PATH": f"{STANDIN}:{os.environ['PATH']}",
}
# The end-to-end run's heavy jobs ask for 3 GB instead of the rules' 8-16 GB, so that two run at
# once on this 23 GB node; given on the command line, these replace the profile's set-resources
# (GPU count), hence gpu=0 here too. The LSF run keeps the profile's and the rules' values.
SMALL_CPU_JOBS = [f"{rule}:{key}" for rule in HEAVY for key in ("gpu=0", "mem_mb=3000")]
QUICK = {"max_epochs": 1, "batch_size": 4}


# --- runs in the background ------------------------------------------------------------------
@dataclass
class Run:
    """One snakemake call in its own folder, started now, waited for later."""

    name: str
    workdir: Path
    args: list
    env: dict
    timeout: int = 600
    proc: subprocess.Popen | None = None
    started: float = 0.0
    wall: float | None = None
    returncode: int | None = None
    watcher: threading.Thread | None = None
    ender: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: list = field(default_factory=list)  # (SLURM job id, time) for the cancel test

    def start(self) -> Run:
        cmd = ["timeout", "-k", "20", str(self.timeout), "nice", "-n", "10", SNAKEMAKE]
        cmd += [*self.args, "-s", str(REPO / "Snakefile"), "--directory", str(self.workdir), "--local-cores", "1"]
        env = {**os.environ, "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.workdir / "stdout.txt", "w") as out, open(self.workdir / "stderr.txt", "w") as err:
            self.started = time.time()
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, cwd=self.workdir, start_new_session=True, text=True
            )
        self.ender = threading.Thread(target=self._time, daemon=True)
        self.ender.start()
        return self

    def _time(self) -> None:
        self.returncode = self.proc.wait()
        self.wall = time.time() - self.started
        self.stop.set()

    def wait(self) -> Run:
        self.ender.join()
        if self.watcher:
            self.watcher.join(timeout=30)
        return self

    def kill(self) -> None:
        """Teardown: stop this run (its process group) and cancel its jobs left on the cluster."""
        self.stop.set()
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        mine = [j["id"] for j in live_jobs() if j["workdir"] == str(self.workdir)]
        if mine:
            subprocess.run(["scancel", *mine], timeout=30)

    @property
    def stdout(self) -> str:
        return (self.workdir / "stdout.txt").read_text()

    @property
    def stderr(self) -> str:
        return (self.workdir / "stderr.txt").read_text()

    def results(self, experiment: str = "sample") -> Path:
        return self.workdir / "results" / experiment

    def slurm_run_id(self) -> str:
        m = re.search(r"SLURM run ID: (\S+)", self.stderr)
        assert m, f"{self.name}: the SLURM plugin printed no run ID:\n{self.stderr[-3000:]}"
        return m[1]


def live_jobs() -> list[dict]:
    """The cluster's queued and running jobs (squeue knows their comment and working folder)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%m|%k|%Z|%j"], capture_output=True, text=True, timeout=30)
    keys = ("id", "state", "memory", "comment", "workdir", "name")
    return [dict(zip(keys, line.split("|", 5))) for line in out.stdout.splitlines() if line.count("|") >= 5]


def sacct(*selection: str) -> list[dict]:
    """Jobs from SLURM's accounting database: what really ran through sbatch."""
    fields = ("id", "name", "state", "req_mem", "submit", "start", "end", "submit_line")
    out = subprocess.run(
        [
            "sacct",
            "-X",
            "-n",
            "-P",
            "-S",
            "now-1days",
            "-o",
            "JobIdRaw,JobName,State,ReqMem,Submit,Start,End,SubmitLine",
        ]
        + list(selection),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [dict(zip(fields, line.split("|", len(fields) - 1))) for line in out.stdout.splitlines() if line.strip()]
    for row in rows:  # the SLURM plugin names rule and wildcards in --comment
        m = re.search(r"--comment rule_(\w+?)_wildcards_(\S+)", row["submit_line"])
        row["rule"], row["wildcards"] = (m[1], m[2]) if m else (None, None)
    return rows


def cancel_when_running(run: Run, comment: str, memory: str, ran_for: float = 5.0) -> None:
    """Watcher thread: scancel each job of `run` whose comment holds `comment` and that asked
    for `memory`, once it has been running for `ran_for` seconds."""
    seen: dict[str, float] = {}
    while not run.stop.wait(1.0):
        for job in live_jobs():
            if job["workdir"] != str(run.workdir) or comment not in job["comment"] or job["memory"] != memory:
                continue
            if job["state"] != "RUNNING":
                continue
            seen.setdefault(job["id"], time.time())
            if time.time() - seen[job["id"]] >= ran_for and job["id"] not in {j for j, _ in run.cancelled}:
                subprocess.run(["scancel", job["id"]], timeout=30)
                run.cancelled.append((job["id"], time.time()))


def configure(workdir: Path, cache: Path, tasks: dict, **changes) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_config(workdir / "config.yaml", cache_dir=str(cache), tasks=tasks, **changes)


# Which background runs the selected tests need: a run starts only if some test uses it.
RUNS = ("slurm_run", "array_run", "lsf_run", "fault_run", "gpu_request_run", "lsf_bad_project_run")


@pytest.fixture(scope="module")
def cluster():
    """The one-node SLURM test cluster, (re)started idempotently. A cluster that is not up is a
    failure, never a skip."""
    up = subprocess.run([str(REPO / "tests" / "cluster" / "slurm-up.sh")], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"tests/cluster/slurm-up.sh failed:\n{up.stdout}\n{up.stderr}"
    return up.stdout


@pytest.fixture(scope="module", autouse=True)
def background(request, cluster, tmp_path_factory, shared_cache):
    mine = [item for item in request.session.items if item.module is request.module]
    needed = {name for item in mine for name in item.fixturenames if name in RUNS}
    runs: dict[str, Run] = {}
    if needed:  # take the TerraTorch registry snapshot once, not in every run at the same time
        warm = f"from geofm import backbones; backbones.snapshot({str(shared_cache)!r})"
        subprocess.run([str(VENV_BIN / "python"), "-c", warm], cwd=REPO, check=True, timeout=300)
    slurm = ["--profile", str(REPO / "profiles" / "slurm")]
    lsf = ["--profile", str(REPO / "profiles" / "lsf")]
    biomass_only = {"crop": {"enabled": False}, "landslide": {"enabled": False}, "biomass": {"overrides": QUICK}}
    cell = "results/sample/out/biomass/tiny"
    if "slurm_run" in needed:
        # The default workflow on the sample data (1 epoch). The status checks come sooner than
        # the profile's (those are sized for hour-long GPU jobs); the fault run keeps them.
        w = tmp_path_factory.mktemp("slurm_run")
        config = configure(w, shared_cache, {t: {"overrides": QUICK} for t in TASKS})
        args = [*slurm, "--configfile", str(config), "--set-resources", *SMALL_CPU_JOBS]
        args += ["--seconds-between-status-checks", "3", "--slurm-init-seconds-before-status-checks", "3"]
        runs["slurm_run"] = Run("slurm_run", w, args, SLURM_SITE, timeout=900)
    if "array_run" in needed:
        # Two seeds of one task: their fine-tunes become ready together (one data check gates
        # both), so the plugin must submit them as one array. In the default run above each
        # task's fine-tune becomes ready alone, when that task's local data check ends.
        w = tmp_path_factory.mktemp("array_run")
        config = configure(w, shared_cache, biomass_only, seeds=[0, 1], preflight=False)
        targets = [f"{cell}/seed{s}/finetune.json" for s in (0, 1)]
        args = [*targets, *slurm, "--configfile", str(config), "--set-resources", *SMALL_CPU_JOBS]
        args += ["--seconds-between-status-checks", "3", "--slurm-init-seconds-before-status-checks", "3"]
        runs["array_run"] = Run("array_run", w, args, SLURM_SITE, timeout=600)
    if "lsf_run" in needed:
        # One task, every heavy step, the LSF profile exactly as written (CPU-only site values).
        w = tmp_path_factory.mktemp("lsf_run")
        config = configure(w, shared_cache, biomass_only)
        args = [*lsf, "--configfile", str(config), "--seconds-between-status-checks", "3"]
        runs["lsf_run"] = Run("lsf_run", w, args, LSF_SITE, timeout=900)
    if "fault_run" in needed:
        # biomass's fine-tune, attempt 1 with 1000 MB, far below what it needs (killed for its
        # memory); its retry, attempt 2, with 4000 MB, cancelled mid-run by the test. The
        # profile's status checks as written.
        w = tmp_path_factory.mktemp("fault_run")
        config = configure(w, shared_cache, biomass_only, preflight=False)
        memory = "finetune:mem_mb=1000 if attempt < 2 else 4000"
        args = [*slurm, "--configfile", str(config), "--set-resources", memory, "finetune:gpu=0"]
        runs["fault_run"] = Run("fault_run", w, [f"{cell}/seed0/finetune.json", *args], SLURM_SITE, timeout=600)
    if "gpu_request_run" in needed:
        # The profile as a GPU user gets it (one GPU of a model, CPUs per GPU): sbatch must be
        # asked for it, and this GPU-less cluster must refuse it at once.
        w = tmp_path_factory.mktemp("gpu_request_run")
        config = configure(w, shared_cache, biomass_only)
        env = {**SLURM_SITE, "GEOFM_SLURM_GPUS": "1", "GEOFM_SLURM_GPU_MODEL": "a100"}
        args = [f"{cell}/seed0/finetune.json", *slurm, "--configfile", str(config)]
        runs["gpu_request_run"] = Run("gpu_request_run", w, args, env, timeout=300)
    if "lsf_bad_project_run" in needed:
        w = tmp_path_factory.mktemp("lsf_bad_project")
        config = configure(w, shared_cache, biomass_only, preflight=False)
        env = {**LSF_SITE, "GEOFM_LSF_PROJECT": "nosuchproject"}
        args = [f"{cell}/seed0/finetune.json", *lsf, "--configfile", str(config)]
        runs["lsf_bad_project_run"] = Run("lsf_bad_project", w, args, env, timeout=300)
    for run in runs.values():
        run.start()
    if "fault_run" in runs:
        fault = runs["fault_run"]
        fault.watcher = threading.Thread(
            target=cancel_when_running, args=(fault, "rule_finetune_wildcards_biomass", "4000M")
        )
        fault.watcher.start()
    if any("default_run" in item.fixturenames for item in mine):
        request.getfixturevalue("default_run")  # the local reference run, while the cluster works
    yield runs
    for run in runs.values():
        run.kill()


def finished(background, name: str) -> Run:
    run = background[name].wait()
    assert run.returncode not in (124, 137), f"{name} hit its hard timeout:\n{run.stderr[-4000:]}"
    return run


@pytest.fixture(scope="module")
def slurm_run(background):
    return finished(background, "slurm_run")


@pytest.fixture(scope="module")
def array_run(background):
    return finished(background, "array_run")


@pytest.fixture(scope="module")
def lsf_run(background):
    return finished(background, "lsf_run")


@pytest.fixture(scope="module")
def fault_run(background):
    return finished(background, "fault_run")


@pytest.fixture(scope="module")
def gpu_request_run(background):
    return finished(background, "gpu_request_run")


@pytest.fixture(scope="module")
def lsf_bad_project_run(background):
    return finished(background, "lsf_bad_project_run")


# --- quick checks (while the runs above go on) -------------------------------------------------
def call(args: list, env: dict, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "10", str(timeout), SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args]
    full_env = {**os.environ, "LIGHTLY_DID_VERSION_CHECK": "True", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd)


def dry_run_jobs(stdout: str) -> dict[str, list[dict]]:
    """{rule: [resources of each job]} from a dry run's job listing."""
    jobs: dict[str, list[dict]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m:
            pairs = [p.split("=", 1) for p in res[1].split(", ")] if res else []
            jobs.setdefault(m[1], []).append({k: v for k, v in pairs})
    return jobs


def test_scheduler_log_is_found_inside_a_slurm_job(tmp_path, cluster):
    """evidence.scheduler_log() inside a real SLURM job: the plugin's log layout, else scontrol."""
    layout = tmp_path / ".snakemake" / "slurm_logs" / "rule_finetune" / "crop_tiny_0"
    layout.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = f"{VENV_BIN}/python -c 'from geofm import evidence; print(evidence.scheduler_log())'"
    ids = []
    for out in (layout / "%j.log", elsewhere / "job-%j.txt"):
        sub = subprocess.run(
            ["sbatch", "--parsable", "-p", "debug", "-A", "geofm", "--mem", "500", "-o", str(out), "-D", str(tmp_path)]
            + ["--export", f"ALL,PYTHONPATH={REPO}", "--wrap", probe],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sub.returncode == 0, sub.stderr
        ids.append(sub.stdout.strip())
    deadline = time.time() + 600  # the cluster may be busy with the runs above
    while time.time() < deadline and any(j["id"] in ids for j in live_jobs()):
        time.sleep(1)
    first, second = layout / f"{ids[0]}.log", elsewhere / f"job-{ids[1]}.txt"
    assert first.read_text().strip() == f"{first.resolve()} (SLURM job {ids[0]})"
    assert second.read_text().strip() == f"{second} (SLURM job {ids[1]})"


@pytest.mark.parametrize(
    "profile,env,expected",
    [
        (
            "slurm",
            {"GEOFM_SLURM_PARTITION": "debug", "GEOFM_SLURM_ACCOUNT": "geofm", "GEOFM_SLURM_GPU_MODEL": "a100"},
            {
                "slurm_partition": "debug",
                "slurm_account": "geofm",
                "gpu": "1",
                "gpu_model": "a100",
                "cpus_per_gpu": "8",
            },
        ),
        (
            "lsf",
            {"GEOFM_LSF_QUEUE": "debug", "GEOFM_LSF_PROJECT": "geofm", "GEOFM_LSF_GPU_MODEL": "NVIDIAA100_SXM4_80GB"},
            {
                "lsf_queue": "debug",
                "lsf_project": "geofm",
                "gpu": "1",
                "lsf_extra": "-gpu num=1:gmodel=NVIDIAA100_SXM4_80GB",
            },
        ),
    ],
)
def test_dry_run_lists_the_jobs_with_their_resources(tmp_path, shared_cache, profile, env, expected):
    """The default experiment as a GPU user with site values sees it: every heavy job with the
    rules' memory and time and the site block's partition/queue, account/project and GPU."""
    config = write_config(tmp_path / "config.yaml", cache_dir=str(shared_cache))
    env = {**env, "PATH": f"{STANDIN}:{os.environ['PATH']}"} if profile == "lsf" else env
    plan = call(
        ["--profile", str(REPO / "profiles" / profile), "--configfile", str(config), "--dry-run"], env, tmp_path
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout)
    assert {rule: counts.get(rule) for rule in HEAVY} == {rule: 3 for rule in HEAVY}
    jobs = dry_run_jobs(plan.stdout)
    rules_mem = {"finetune": ("16000", "240"), "evaluate": ("16000", "60")}
    for rule in HEAVY:
        assert len(jobs[rule]) == 3
        for resources in jobs[rule]:
            assert {k: resources.get(k) for k in expected} == expected, (rule, resources)
            assert (resources.get("mem_mb"), resources.get("runtime")) == rules_mem[rule], (rule, resources)
    # The cheap steps declare no GPU: they are login-node rules.
    assert not any("gpu" in r for rule, rs in jobs.items() if rule not in HEAVY for r in rs)


@pytest.mark.parametrize(
    "profile,env,says",
    [
        ("slurm", {"GEOFM_SLURM_PARTITION": "nosuchpartition"}, "SLURM partition 'nosuchpartition' does not exist"),
        ("slurm", {"GEOFM_SLURM_ACCOUNT": "nosuchaccount"}, "SLURM account 'nosuchaccount' is not one of"),
        (
            "lsf",
            {"GEOFM_LSF_QUEUE": "nosuchqueue", "PATH": f"{STANDIN}:{os.environ['PATH']}"},
            "LSF queue 'nosuchqueue'",
        ),
    ],
)
def test_bad_site_value_stops_before_anything_runs(tmp_path, shared_cache, profile, env, says):
    config = write_config(tmp_path / "config.yaml", cache_dir=str(shared_cache))
    t0 = time.time()
    result = call(["--profile", str(REPO / "profiles" / profile), "--configfile", str(config)], env, tmp_path, 60)
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.time() - t0 < 30
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("profile error: ") and says in message
    assert f"profiles/{profile}/config.yaml" in message  # names the place to fix it
    assert not (tmp_path / "results").exists() and not (tmp_path / ".snakemake").exists()


# --- the default workflow through profiles/slurm ------------------------------------------------
def test_slurm_run_succeeds(slurm_run):
    assert slurm_run.returncode == 0, slurm_run.stderr[-5000:]
    print(f"SLURM end-to-end run: {slurm_run.wall:.0f} s")


def test_every_heavy_job_went_through_sbatch(slurm_run):
    """Each heavy job ran once as a SLURM job; every other rule ran locally."""
    assert slurm_run.returncode == 0
    jobs = sacct("--name", slurm_run.slurm_run_id())
    tasks = {rule: [j for j in jobs if j["rule"] == rule] for rule in HEAVY}
    assert {rule: len(found) for rule, found in tasks.items()} == {"finetune": 3, "evaluate": 3}
    assert {j["rule"] for j in jobs} == set(HEAVY), "no other rule reached the scheduler"
    assert {j["state"] for j in jobs} == {"COMPLETED"}
    calls = {j["submit_line"] for j in jobs}
    print(f"\nsbatch calls: {len(calls)} for {len(jobs)} heavy jobs")
    for job in jobs:  # the venv's Python runs each job (sbatch exports the environment)
        assert f"{VENV_BIN.parent.resolve()}/bin/python -m snakemake" in job["submit_line"], job["submit_line"]
        assert "--mem" in job["submit_line"] and "-p debug" in job["submit_line"] and "-A geofm" in job["submit_line"]


def test_fine_tunes_ready_together_go_in_one_sbatch_array(array_run):
    """The profile's slurm-array-jobs: two fine-tunes that became ready together went to SLURM in
    one sbatch call as a two-task array, each task wrote its own seed's outputs."""
    assert array_run.returncode == 0, array_run.stderr[-5000:]
    jobs = sacct("--name", array_run.slurm_run_id())
    assert [j["rule"] for j in jobs] == ["finetune", "finetune"] and {j["state"] for j in jobs} == {"COMPLETED"}
    calls = {j["submit_line"] for j in jobs}
    assert len(calls) == 1 and "--array=1-2" in calls.pop(), "one sbatch call for both fine-tunes"
    cell = array_run.results() / "out" / "biomass" / "tiny"
    recorded = {json.loads((cell / f"seed{s}" / "finetune.json").read_text())["scheduler_job_id"] for s in (0, 1)}
    assert recorded == {j["id"] for j in jobs}, (recorded, jobs)


def test_an_array_task_trains_the_same_model_as_a_single_job(slurm_run, array_run):
    """biomass seed 0 ran as a plain sbatch job in the default run and as an array task here
    (same rendered settings and data): the same epochs, losses and selected score."""
    assert slurm_run.returncode == 0 and array_run.returncode == 0
    single = [
        j for j in sacct("--name", slurm_run.slurm_run_id()) if j["rule"] == "finetune" and "biomass" in j["wildcards"]
    ]
    assert len(single) == 1 and "--array" not in single[0]["submit_line"]
    cells = [run.results() / "out" / "biomass" / "tiny" / "seed0" for run in (slurm_run, array_run)]
    curves = [(cell / "curves.csv").read_text() for cell in cells]
    assert curves[0] == curves[1] and len(curves[0].splitlines()) >= 2
    scores = [json.loads((cell / "finetune.json").read_text())["selection"]["best_score"] for cell in cells]
    assert scores[0] == scores[1] is not None


def test_heavy_outputs_were_written_by_those_jobs(slurm_run):
    """Each heavy output records the job it ran in: a distinct SLURM job (array task) of its rule."""
    assert slurm_run.returncode == 0
    ids = {rule: set() for rule in HEAVY}
    for job in sacct("--name", slurm_run.slurm_run_id()):
        ids[job["rule"]].add(job["id"])
    out = slurm_run.results() / "out"
    recorded = {rule: [] for rule in HEAVY}
    for task in TASKS:
        for rule, name in (("finetune", "finetune.json"), ("evaluate", "evaluate.json")):
            recorded[rule].append(json.loads((out / task / "tiny" / "seed0" / name).read_text())["scheduler_job_id"])
    for rule in HEAVY:
        assert set(recorded[rule]) == ids[rule] and len(set(recorded[rule])) == 3, (rule, recorded[rule], ids[rule])


def shape(path: Path):
    """What must match between a cluster run and a local run: structure, not values."""
    if path.suffix == ".json":

        def skeleton(v):
            if isinstance(v, dict):
                return {k: skeleton(x) for k, x in v.items()}
            return "list" if isinstance(v, list) else "value"

        return skeleton(json.loads(path.read_text()))
    if path.suffix in (".yaml", ".yml"):
        return sorted(yaml.safe_load(path.read_text()) or {})
    if path.suffix == ".csv":
        rows = list(csv.reader(path.open()))
        # one row per cell in the summary; other tables' rows follow epochs or results
        return (rows[0], len(rows)) if path.name == "summary.csv" else rows[0]
    if path.suffix == ".png":
        return Image.open(path).size
    return "file"


def shapes(root: Path, under: str = "", everything: bool = False) -> dict:
    """{file: shape} under root/under; logs and benchmarks (timings) only with `everything`, by name."""
    return {
        str(p.relative_to(root)): "file" if everything else shape(p)
        for p in sorted((root / under).rglob("*"))
        if p.is_file() and (everything or not p.name.endswith((".log", ".tsv")))
    }


def test_outputs_equal_a_local_run_in_shape(slurm_run, default_run):
    assert slurm_run.returncode == 0
    local_dir, local = default_run
    assert local.returncode == 0, local.stderr[-3000:]
    cluster_shapes, local_shapes = shapes(slurm_run.results()), shapes(local_dir / "results" / "sample")
    assert sorted(cluster_shapes) == sorted(local_shapes), "the same files"
    differ = {f: (cluster_shapes[f], local_shapes[f]) for f in local_shapes if cluster_shapes[f] != local_shapes[f]}
    assert not differ
    # Logs and benchmarks exist for the same steps.
    for sub in ("logs", "benchmarks"):
        assert set(shapes(slurm_run.results(), sub, everything=True)) == set(
            shapes(local_dir / "results" / "sample", sub, everything=True)
        )


# --- the same through profiles/lsf and the LSF stand-in ---------------------------------------
def test_lsf_run_sends_every_heavy_job_through_bsub(lsf_run):
    assert lsf_run.returncode == 0, lsf_run.stderr[-5000:]
    submitted = dict(re.findall(r"Job \d+ has been submitted with LSF jobid (\d+) \(log: (\S+)\)", lsf_run.stderr))
    jobs = {j["id"]: j for j in sacct("-j", ",".join(submitted))} if submitted else {}
    rules = sorted(re.match(r"Snakemake_rule_(\w+?):", jobs[i]["name"])[1] for i in submitted if i in jobs)
    assert rules == sorted(HEAVY), lsf_run.stderr[-3000:]
    assert {jobs[i]["state"] for i in submitted} == {"COMPLETED"}
    # The profile's and the rules' resources, through bsub: rusage[mem] per slot, -W minutes.
    finetune = next(jobs[i] for i in submitted if jobs[i]["name"].startswith("Snakemake_rule_finetune"))
    assert finetune["req_mem"].startswith("16000M") and "--time=240" in finetune["submit_line"]
    out = lsf_run.results() / "out" / "biomass" / "tiny"
    recorded = {
        json.loads((out / "seed0" / "finetune.json").read_text())["scheduler_job_id"],
        json.loads((out / "seed0" / "evaluate.json").read_text())["scheduler_job_id"],
    }
    assert recorded == set(submitted)


def test_lsf_outputs_equal_a_local_run_in_shape(lsf_run, default_run):
    assert lsf_run.returncode == 0
    local_dir, local = default_run
    assert local.returncode == 0
    for under in ("out/biomass", "predictions/biomass"):
        assert shapes(lsf_run.results(), under) == shapes(local_dir / "results" / "sample", under)


def test_lsf_bad_project_fails_at_the_first_submission(lsf_bad_project_run):
    run = lsf_bad_project_run
    assert run.returncode == 1
    assert "LSF job submission failed" in run.stderr and "nosuchproject: Not a valid project" in run.stderr
    assert run.wall < 180
    assert not list((run.workdir / ".snakemake").glob("lsf_logs/*/*/*.log")), "no job reached the scheduler"


# --- what a GPU user gets -------------------------------------------------------------------
def test_gpu_request_reaches_sbatch(gpu_request_run):
    """With the site block's default of one GPU per heavy job (model a100), sbatch is asked for it;
    this cluster has no GPU, refuses it, and the run ends (after the one retry), no hang."""
    run = gpu_request_run
    assert run.returncode == 1
    calls = re.findall(r"sbatch call:\s*\n\s*(sbatch .*)", run.stderr)
    assert calls, run.stderr[-3000:]
    assert all("--gpus=a100:1" in c and "--cpus-per-gpu=1" in c for c in calls)
    assert "Invalid generic resource (gres) specification" in run.stderr
    assert run.wall < 240


# --- faults: a cancelled job, a job over its memory -------------------------------------------
def reported_at(stderr: str, job_id: str) -> float | None:
    """When snakemake reported SLURM job `job_id` as failed (the timestamp above the error)."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"external_jobid: {job_id}":
            stamps = [x for x in lines[:i] if re.fullmatch(r"\[\w{3} \w{3} +\d+ [\d:]{8} \d{4}\]", x.strip())]
            return time.mktime(time.strptime(stamps[-1].strip()[1:-1], "%a %b %d %H:%M:%S %Y")) if stamps else None
    return None


def fault_jobs(run: Run) -> list[dict]:
    return [
        j for j in sacct("--name", run.slurm_run_id()) if (j["rule"], j["wildcards"]) == ("finetune", "biomass_tiny_0")
    ]


def test_job_over_its_memory_is_retried_with_more(fault_run):
    run = fault_run
    jobs = fault_jobs(run)
    assert [(j["state"], j["req_mem"]) for j in jobs][:1] == [("FAILED", "1000M")], run.stderr[-3000:]
    assert [j["req_mem"] for j in jobs[1:]] == ["4000M"], "one retry, with the memory of attempt 2"
    assert f"SLURM-job '{jobs[0]['id']}' failed, SLURM status is: 'FAILED'" in run.stderr
    kept = run.workdir / ".snakemake" / "slurm_logs" / "rule_finetune" / "biomass_tiny_0" / f"{jobs[0]['id']}.log"
    assert "exceeded memory limit" in kept.read_text(), "the failed attempt's scheduler log is kept and says why"


def test_cancelled_job_fails_the_run_within_minutes(fault_run):
    run = fault_run
    assert len(run.cancelled) == 1, f"the retry was cancelled mid-run: {run.cancelled}\n{run.stderr[-3000:]}"
    job_id, at = run.cancelled[0]
    assert run.returncode == 1
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in run.stderr
    seen = reported_at(run.stderr, job_id)
    assert seen is not None and seen - at < 120, f"job {job_id} cancelled at {at}, reported at {seen}"
    assert run.started + run.wall - at < 180, "the run ended within minutes of the cancel"
    assert [j["state"] for j in sacct("-j", job_id)] == ["CANCELLED by 0"]  # what sacct says (NOTES)


def test_killed_job_leaves_err_file_linking_its_scheduler_log(fault_run):
    results = fault_run.results()
    job_id = fault_run.cancelled[0][0]
    err = (results / "err" / "biomass_tiny_seed0.err").read_text()
    assert "stage: finetune" in err and "cell: biomass/tiny/seed0" in err
    cause = next(line for line in err.splitlines() if line.startswith("cause: "))
    assert cause == f"cause: killed by the scheduler: cancelled (SLURM job {job_id}: CANCELLED); see its scheduler log"
    link = next(line for line in err.splitlines() if line.startswith("scheduler log: "))
    log = Path(link.split()[2])
    assert log == (fault_run.workdir / ".snakemake/slurm_logs/rule_finetune/biomass_tiny_0" / f"{job_id}.log").resolve()
    assert f"JOB {job_id} ON" in log.read_text() and "CANCELLED AT" in log.read_text()
    assert f"--- last 40 lines of {log} ---" in err
    rows = {r["task"]: r for r in csv.DictReader(open(results / "out" / "summary.csv"))}
    assert rows["biomass"]["status"] == "failed" and "cancelled" in rows["biomass"]["error"]
    assert "biomass/tiny/seed0: killed by the scheduler" in fault_run.stderr
