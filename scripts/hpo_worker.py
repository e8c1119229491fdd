"""Rule hpo_worker: one of the workers of a task x model's search; it ends when the study holds
hpo.trials finished trials (geofm/hpo.py)."""

import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm import hpo

    p = sm.params.search
    study = hpo.open_study(
        p["study"], p["storage"], p["direction"], p["sampler"], p["pruner"], p["heartbeat"], int(sm.wildcards.worker)
    )
    summary = hpo.run_worker(
        study, Path(sm.input.config), sm.params.job, p["space"], p["trials"], Path(p["trials_dir"]), threads=sm.threads
    )
    Path(sm.output[0]).write_text(json.dumps(summary, indent=2))
