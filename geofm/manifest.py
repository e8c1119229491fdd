"""Provenance: the experiment manifest (code commit, config hash, rendered configs, packages, data, weights,
hardware, scheduler job ids, seeds).

(Each dataset's manifest, every file's size and content hash per split, is written by the
validate_data rule: geofm/datacheck.py.) Manifests hold no timestamps: the same code, config and data give the same bytes, and
any changed data file changes them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

from geofm import lockfile

PACKAGES = [
    "terratorch", "torch", "torchvision", "lightning", "torchgeo", "torchmetrics", "timm",
    "snakemake", "snakemake-executor-plugin-slurm", "snakemake-executor-plugin-lsf", "dvc", "numpy", "rasterio", "h5py",
]  # fmt: skip


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(root: Path) -> str:
    """Cheap change detector (names, sizes, modification times) that decides when the dataset
    manifest, which reads every byte, must be recomputed."""
    entries = []
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            st = path.stat()
            entries.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sha256_json(entries)


def code_version(folder: Path) -> dict:
    """The workflow's git commit and whether its tracked files differ from it."""

    def git(*args):
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def experiment_manifest(
    *,
    code: dict,
    config_hash: str,
    seeds: list[int],
    packages: dict,
    datasets: list[Path],
    configs: list[Path],
    resources: list[Path],
    weights: dict[str, str | None],
) -> dict:
    hardware, jobs, splits = set(), [], {}
    for path in resources:
        report = json.loads(Path(path).read_text())
        if report.get("splits"):  # which chips selected the checkpoint and which are reported
            facts = report["splits"]
            splits[str(Path(path).parent)] = {
                k: facts[k] for k in ("selection", "test", "shared_selection_test", "leaky") if k in facts
            }
        gpu = report.get("gpu") or {}
        hardware.add((report.get("cpu_model"), gpu.get("name"), gpu.get("driver")))
        if report.get("scheduler_job_id"):
            jobs.append({"output": str(path), "job_id": report["scheduler_job_id"], "host": report.get("host")})
    data = {}
    for path in datasets:
        m = json.loads(Path(path).read_text())
        data[m["task"]] = {
            "sha256": m["sha256"],
            **{s: {k: v[k] for k in ("files", "bytes", "sha256")} for s, v in m["splits"].items()},
        }
    return {
        "code": code,
        "config_sha256": config_hash,
        "seeds": seeds,
        "packages": packages,
        "datasets": data,
        "rendered_configs": {str(p): sha256_file(Path(p)) for p in sorted(configs, key=str)},
        "weights": {model: (sha256_file(Path(w)) if w else None) for model, w in sorted(weights.items())},
        "hardware": [{"cpu": c, "gpu": g, "driver": d} for c, g, d in sorted(hardware, key=str)],
        "splits": dict(sorted(splits.items())),
        "scheduler_jobs": sorted(jobs, key=lambda j: j["output"]),
    }


def write(layout, cells, tasks: list[str], provenance: dict) -> dict:
    """out/manifest.json for a run's cells (only the files that exist: a failed cell has none)."""
    files = [layout.cell_file(name, *c) for c in cells for name in ("finetune.json", "evaluate.json")]
    document = experiment_manifest(
        code=provenance["code"],
        config_hash=provenance["config_hash"],
        seeds=provenance["seeds"],
        packages=provenance["packages"],
        datasets=[Path(layout.dataset_manifest(t)) for t in tasks if Path(layout.dataset_manifest(t)).is_file()],
        configs=[Path(p) for c in cells if (p := layout.cell_file("config.yaml", *c)) and Path(p).is_file()],
        resources=[Path(f) for f in files if Path(f).is_file()],
        weights=provenance["weights"],
    )
    document["lock"] = lockfile.lock_status()  # the lock's hash, and packages that differ from it
    Path(layout.table("manifest.json")).write_text(json.dumps(document, indent=2))
    return document
