"""Rule dataset_manifest: sizes and content hashes of every file of a dataset, per split."""

import json
from pathlib import Path

from geofm import evidence, manifest

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    document = manifest.dataset_manifest(sm.wildcards.task, Path(sm.params.data_root))
    Path(sm.output[0]).write_text(json.dumps(document, indent=1))
