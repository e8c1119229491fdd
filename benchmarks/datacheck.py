#!/usr/bin/env python3
"""Cost of checking every dataset file (validate_data) over hashing alone, per task.

For each task, sample data in the real on-disk format (--chips training chips, the other
splits as generated; uncompressed like most published chips, or --compressed) is (a) hashed file by file, as the dataset manifest did before the checks
(read + sha256), and (b) validated: read once, hashed and decoded and checked against the task's
format (geofm/datacheck.py). Prints files per second of each and the overhead of (b) over (a),
median of --repeats runs, from the page cache (CPU-bound) or, with --cold, from disk.

Floor (issue 14): the check adds at most 10% to the pass that already reads every byte.

    .venv/bin/python benchmarks/datacheck.py [--chips 96] [--repeats 3] [--tasks crop,landslide]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geofm import datacheck, sample_data  # noqa: E402
from geofm.tasks import TASKS  # noqa: E402


def hash_only(task: str, root: Path) -> int:
    files = [f for split in TASKS[task].split_files(root).values() for f in split]
    for path in files:
        hashlib.sha256(path.read_bytes()).hexdigest()
    return len(files)


def cold(drop: bool) -> None:
    if drop:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chips", type=int, default=96, help="chips in the largest (training) split")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--compressed", action="store_true", help="deflate/gzip inside the files, as the sample data")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each pass (root), so both read from disk as on a real dataset")  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="geofm-datacheck-") as tmp:
        for task in args.tasks.split(","):
            spec = TASKS[task]
            counts = dict(spec.sample_counts)
            counts[next(iter(counts))] = args.chips
            root = Path(tmp) / task
            sample_data.write(task, root, seed=0, counts=counts, compressed=args.compressed)
            hash_only(task, root)  # into the page cache (unless --cold drops it before each pass)
            hashed, checked = [], []
            for _ in range(args.repeats):
                cold(args.cold)
                t0 = time.perf_counter()
                files = hash_only(task, root)
                hashed.append(time.perf_counter() - t0)
                cold(args.cold)
                t0 = time.perf_counter()
                _, report = datacheck.validate(task, root)
                checked.append(time.perf_counter() - t0)
            assert not report.errors, report.errors[:3]
            h, c = statistics.median(hashed), statistics.median(checked)
            size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
            rows.append((task, files, size, files / h, files / c, c / h))
    print(f"{'task':<12}{'files':>7}{'MB':>8}{'hash only files/s':>19}{'hash+check files/s':>20}{'check / hash':>14}")
    for task, files, size, fh, fc, ratio in rows:
        print(f"{task:<12}{files:>7}{size:>8.0f}{fh:>19.0f}{fc:>20.0f}{ratio:>14.2f}")
    print("floor: check / hash <= 1.10 (the check adds at most 10% to the pass that reads every byte)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
