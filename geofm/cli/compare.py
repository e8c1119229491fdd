"""geofm-compare: compare two experiments: per task, model and metric, the difference of the seed means with a
bootstrap interval, marked significant or not.

Each side is a results folder (results/<experiment>) or a git revision and folder
(<rev>:results/<experiment>, read from the versioned text results). Two experiments on
different data (their dataset manifests differ) are refused unless --allow-different-data.

    geofm-compare results/exp-a results/exp-b --out comparison/
    geofm-compare HEAD~1:results/exp HEAD:results/exp
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from geofm import stats
from geofm.formatting import markdown
from geofm.layout import ResultsLayout

COLUMNS = [
    "task",
    "model",
    "metric",
    "seeds_a",
    "seeds_b",
    "mean_a",
    "mean_b",
    "difference",
    "ci_low",
    "ci_high",
    "significant",
    "note",
]


class Side:
    """One experiment's text results, from a folder or from a git revision."""

    def __init__(self, spec: str, repo: Path) -> None:
        self.spec, self.repo = spec, repo
        if ":" in spec and not Path(spec).exists():
            self.rev, self.folder = spec.split(":", 1)
        else:
            self.rev, self.folder = None, spec
        self.layout = ResultsLayout.of(self.folder.rstrip("/"))
        if not self.files():
            raise SystemExit(
                f"compare: no results found at {spec}; fix: give results/<experiment> or <rev>:results/<experiment>"
            )

    def files(self) -> list[str]:
        """Every JSON file under the experiment's out/ (a folder, or a git revision's tree)."""
        if self.rev is None:
            return sorted(str(p) for p in Path(self.layout.out).rglob("*.json"))
        out = subprocess.run(
            ["git", "-C", str(self.repo), "ls-tree", "-r", "--name-only", self.rev, "--", self.layout.out],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"compare: {out.stderr.strip()}; fix: give an existing revision")
        return sorted(f for f in out.stdout.split() if f.endswith(".json"))

    def read(self, path: str) -> dict:
        if self.rev is None:
            return json.loads(Path(path).read_text())
        text = subprocess.run(
            ["git", "-C", str(self.repo), "show", f"{self.rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(text)

    def cells(self) -> list[dict]:
        cells = []
        for path in self.files():
            cell = self.layout.cell_of(path)
            if cell:
                task, model, seed = cell
                cells.append({"task": task, "model": model, "seed": seed, "metrics": self.read(path)["pinned"]})
        return cells

    def datasets(self) -> dict[str, str]:
        return {task: self.read(p)["sha256"] for p in self.files() if (task := self.layout.dataset_of(p))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="results/<experiment> or <rev>:results/<experiment>")
    parser.add_argument("b", help="the experiment to compare against (difference = a - b)")
    parser.add_argument("--out", type=Path, help="folder for comparison.csv and comparison.md")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git repository for <rev>: specs")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--allow-different-data", action="store_true")
    parser.add_argument("--all-metrics", action="store_true", help="print every metric, not only headlines")
    args = parser.parse_args(argv)

    a, b = Side(args.a, args.repo), Side(args.b, args.repo)
    data_a, data_b = a.datasets(), b.datasets()
    differing = sorted(t for t in set(data_a) & set(data_b) if data_a[t] != data_b[t])
    if differing and not args.allow_different_data:
        print(f"compare: the experiments used different data for {', '.join(differing)} (dataset manifests differ); "
              "fix: compare runs on the same data, or pass --allow-different-data", file=sys.stderr)  # fmt: skip
        return 2
    rows = stats.compare(
        a.cells(), b.cells(), {"resamples": args.resamples, "seed": args.seed, "confidence": args.confidence}
    )
    for row in rows:
        if row["task"] in differing:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "different data"
    shown = rows if args.all_metrics else [r for r in rows if r["headline"]]
    print(
        f"A = {args.a}\nB = {args.b}\ndifference = mean(A) - mean(B); {int(args.confidence * 100)}% bootstrap interval over seeds\n"
    )
    print(markdown(shown, COLUMNS))
    significant = [r for r in rows if r["significant"]]
    print(f"{len(significant)} of {len(rows)} task/model/metric differences are significant.")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "comparison.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS + ["headline"])
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "comparison.md").write_text(f"A = `{args.a}`, B = `{args.b}`\n\n" + markdown(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
