"""Rule fetch_weights: download pretrained backbone weights on the login node, verified.

Compute nodes often have no internet; jobs read the file this rule leaves in the cache. The file
is cached by hub id, file name and revision, and checked against its sha256 (models.<m>.hub_sha256,
else the one pinned by an earlier download, else, with downloads.trust_published, the hub's own).
"""

import os
import shutil
from pathlib import Path

from geofm import download, evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    model, settings, cache = sm.params.model, sm.params.downloads, Path(sm.params.cache)
    got = download.fetch_weights(
        model["hub_id"],
        model["hub_filename"],
        cache,
        endpoint=os.environ.get("HF_ENDPOINT") or settings["hf_endpoint"],
        revision=model["hub_revision"],
        sha256=model["hub_sha256"],
        trust_published=settings["trust_published"],
        pins=cache / "pins.json",
        timeout=tuple(settings["timeout"]),
        attempts=settings["attempts"],
    )
    out = Path(sm.output[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    try:
        os.link(got.path, out)  # no second copy of a multi-GB checkpoint
    except OSError:
        shutil.copyfile(got.path, out)
    print(f"{model['hub_id']}/{model['hub_filename']}@{model['hub_revision']} (commit {got.commit}): "
          f"sha256 {got.sha256}, {got.verified_by} -> {out}")  # fmt: skip
