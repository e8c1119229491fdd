"""Rule baseline: the score of a model that ignores its input, per task."""

import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    import torch

    from geofm.metrics import trivial_baseline
    from geofm.tasks import SEGMENTATION, TASKS

    task, root = sm.wildcards.task, Path(sm.params.data_root)
    spec = TASKS[task]
    splits = Path(sm.input.splits).parent if sm.input.splits else None
    train = [torch.from_numpy(a) for a in spec.labels(root, "train", splits)]
    test = [torch.from_numpy(a) for a in spec.labels(root, "test", splits)]
    scores = trivial_baseline(task, train, test)
    result = {
        "task": task,
        "baseline": "majority training class" if spec.kind == SEGMENTATION else "training mean",
        "reported_split": spec.test_split,
        "headline": spec.headline,
        "pinned": scores,
        "definitions": spec.definitions,
    }
    Path(sm.output[0]).write_text(json.dumps(result, indent=2))
