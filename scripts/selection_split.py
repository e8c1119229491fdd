"""Rule selection_split: the deterministic hold-out of a task without a usable validation split
(train / select / test id lists)."""

from pathlib import Path

from geofm import evidence
from geofm.tasks import TASKS
from geofm.tasks.base import write_split_lists

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    splits = TASKS[sm.wildcards.task].holdout_split(Path(sm.params.data_root))
    write_split_lists(splits, Path(sm.output.select).parent)
    print("\n".join(f"{name}: {len(ids)} chips" for name, ids in splits.items()))
