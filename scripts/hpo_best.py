"""Rule hpo_best: the best parameters of a task x model's search, its trials, cost and plots."""

import json
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from geofm import hpo, tables

    p = sm.params.search
    study = hpo.load_study(p["study"], p["storage"], p["heartbeat"])
    result = hpo.best(study)
    if result["finished"] < p["trials"]:
        raise RuntimeError(
            f"study {p['study']}: {result['finished']} of {p['trials']} trials finished ({result['counts']}); "
            "fix: run the workflow again (the workers resume the study)"
        )
    result["overrides"] = hpo.as_overrides(result["params"], p["space"])  # what the seed cells train with
    result["cost"] = hpo.cost(study)
    result["space"] = p["space"]
    Path(sm.output.best).write_text(json.dumps(result, indent=2, sort_keys=True))
    tables.write_csv(sm.output.trials, hpo.trials_table(study))
    hpo.plots(study, Path(sm.output.history).parent)
