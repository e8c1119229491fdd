"""Rule fetch_weights: download pretrained backbone weights on the login node.

Compute nodes often have no internet; jobs read the file this rule leaves in the cache.
"""

import os
import shutil
from pathlib import Path

from geofm import evidence

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    from huggingface_hub import hf_hub_download

    from geofm import backbones

    model = sm.params.model
    default_repo, default_file = backbones.hub_file(backbones.snapshot(Path(sm.params.cache).parent), model["backbone"])
    repo = model["hub_id"] or default_repo
    filename = model["hub_filename"] or default_file
    if not repo or not filename:
        raise RuntimeError(
            f"no weights to download for {model['backbone']}: set hub_id and hub_filename, or weights: <local file>"
        )
    os.environ.pop("HF_HUB_OFFLINE", None)
    path = hf_hub_download(repo_id=repo, filename=filename, cache_dir=sm.params.cache)
    shutil.copyfile(path, sm.output[0])
    print(f"downloaded {repo}/{filename} -> {sm.output[0]}")
