"""Rule manifest: the experiment's provenance in out/manifest.json."""

import json
from pathlib import Path

from geofm import evidence, manifest

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    p = sm.params.provenance
    document = manifest.experiment_manifest(
        code=p["code"],
        config_hash=p["config_hash"],
        seeds=p["seeds"],
        packages=p["packages"],
        datasets=[Path(x) for x in sm.input.datasets],
        configs=[Path(x) for x in sm.input.configs],
        resources=[Path(x) for x in sm.input.resources],
        weights=p["weights"],
    )
    Path(sm.output[0]).write_text(json.dumps(document, indent=2))
