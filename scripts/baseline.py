"""Rule baseline: the score of a model that ignores its input, per task."""

import json
from pathlib import Path

from geofm import errors

sm = snakemake  # noqa: F821 (provided by Snakemake)
with errors.captured(sm.log[0]):
    import torch

    from geofm.metrics import trivial_baseline
    from geofm.tasks import DEFINITIONS, TASKS, labels

    task, root = sm.wildcards.task, Path(sm.params.data_root)
    splits = Path(sm.input.splits).parent if sm.input.splits else None
    train = [torch.from_numpy(a) for a in labels(task, root, "train", splits)]
    test = [torch.from_numpy(a) for a in labels(task, root, "test", splits)]
    scores = trivial_baseline(task, train, test)
    spec = TASKS[task]
    result = {
        "task": task,
        "baseline": "majority training class" if spec.kind == "segmentation" else "training mean",
        "reported_split": spec.test_split,
        "headline": spec.headline,
        "pinned": scores,
        "definitions": DEFINITIONS[task],
    }
    Path(sm.output[0]).write_text(json.dumps(result, indent=2))
