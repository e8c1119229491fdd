"""Rule sample_data: write one task's synthetic dataset in the real on-disk format."""

from pathlib import Path

from geofm import evidence, sample_data
from geofm.tasks import TASKS

with evidence.captured(snakemake.log[0]):  # noqa: F821 (provided by Snakemake)
    task = snakemake.wildcards.task  # noqa: F821
    root = Path(snakemake.output[0])  # noqa: F821
    sample_data.write(task, root, snakemake.params.seed)  # noqa: F821
    problem = TASKS[task].check_layout(root)
    if problem:
        raise RuntimeError(f"generated sample data fails the layout check: {problem}")
