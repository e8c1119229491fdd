#!/usr/bin/env python3
"""Planning cost: `snakemake --dry-run` for 1 cell versus 3 tasks x 50 models x 10 seeds
(1,500 cells), and a trivial Snakefile (one rule, `touch`, no input functions) planned with the
same two job counts. Prints wall time and peak memory (median of --repeats runs), the per-job
planning cost of each ((big - small) / (jobs added)) and their ratio.

Floor (issue 12): the workflow's per-job planning cost at most 1.2x the trivial Snakefile's;
under 1 GB of memory.

    .venv/bin/python benchmarks/planning.py [--repeats 3] [--models 50] [--seeds 10]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import warn_if_slurm_client_without_controller

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def configs(folder: Path, models: int, seeds: int) -> dict[str, Path]:
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base["cache_dir"] = str(REPO / "resources" / "cache")
    small = dict(base, seeds=[0], tasks={"crop": {}, "landslide": {"enabled": False}, "biomass": {"enabled": False}})
    big = dict(
        base,
        seeds=list(range(seeds)),
        models={
            f"m{i:03d}": {"backbone": "prithvi_eo_tiny", "overrides": {"lr": 1e-4 * (i + 1)}} for i in range(models)
        },
    )
    paths = {}
    for name, config in (("small", small), ("big", big)):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


TRIVIAL = """
rule all:
    input:
        expand("out/{i}.txt", i=range(config["jobs"] - 1)),


rule make:
    output:
        "out/{i}.txt",
    shell:
        "touch {output}"
"""


def dry_run(folder: Path, config: Path, snakefile: Path = REPO / "Snakefile") -> tuple[float, float, int]:
    """(seconds, peak MB, jobs) of one dry-run, measured by /usr/bin/time."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", SNAKEMAKE, "-s", str(snakefile), "--directory", str(folder)]
    cmd += ["--configfile", str(config), "--dry-run", "--quiet", "rules"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    seconds, kb = re.search(r"TIME ([\d.]+) (\d+)", out.stderr).groups()
    jobs = int(re.search(r"^total\s+(\d+)", out.stdout, re.M).group(1))
    return float(seconds), int(kb) / 1024, jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    warn_if_slurm_client_without_controller()
    with tempfile.TemporaryDirectory(prefix="geofm-plan-") as tmp:
        folder = Path(tmp)
        paths = configs(folder, args.models, args.seeds)
        dry_run(folder, paths["small"])  # warm caches (registry snapshot, bytecode)
        results = {}
        for name in ("small", "big"):
            runs = [dry_run(folder, paths[name]) for _ in range(args.repeats)]
            results[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[0][2])
        trivial = folder / "trivial"
        trivial.mkdir()
        (trivial / "Snakefile").write_text(TRIVIAL)
        for name in ("small", "big"):
            config = trivial / f"{name}.yaml"
            config.write_text(yaml.safe_dump({"jobs": results[name][2]}))
            runs = [dry_run(trivial, config, trivial / "Snakefile") for _ in range(args.repeats)]
            results[f"trivial {name}"] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[0][2])
    cells = {"small": 1, "big": 3 * args.models * args.seeds, "trivial small": "-", "trivial big": "-"}
    print(f"{'plan':<15}{'cells':>7}{'jobs':>7}{'seconds':>10}{'peak MB':>10}")
    for name, (seconds, mb, jobs) in results.items():
        print(f"{name:<15}{cells[name]:>7}{jobs:>7}{seconds:>10.2f}{mb:>10.0f}")

    def per_job(prefix: str) -> float:
        small, big = results[f"{prefix}small"], results[f"{prefix}big"]
        return (big[0] - small[0]) / (big[2] - small[2])

    ours, trivial_cost = per_job(""), per_job("trivial ")
    print(f"per-job planning cost: workflow {1000 * ours:.2f} ms, trivial Snakefile {1000 * trivial_cost:.2f} ms; "
          f"ratio {ours / trivial_cost:.2f} (floor: <= 1.2); big peak memory {results['big'][1]:.0f} MB (floor: < 1024)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
