"""Shared cache paths, keyed by everything that defines their content.

A cache shared by many runs (the watcher's `--cache-root`, or a user's `cache_dir`) must never
hand one experiment another's files: a fresh checkout has no Snakemake metadata to notice a
changed parameter. So each entry's folder name carries its parameters:

- pretrained weights: the backbone, the hub repository, the file in it and its revision;
- sample data: the task, the generator's seed and the generator's version
  (SAMPLE_DATA_VERSION: bump it whenever geofm/sample_data.py writes different files).

Readable prefixes keep the folders recognisable; a hash of the full parameters keeps them
apart (and their names safe, whatever the strings hold).
"""

from __future__ import annotations

import hashlib
import json
import re

SAMPLE_DATA_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _key(readable: str, params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', readable).strip('._')[:60] or 'x'}-{digest}"


def weights_key(backbone: str, hub_id: str | None, hub_filename: str | None, revision: str | None = None) -> str:
    """Folder name of one set of pretrained weights."""
    params = {"backbone": backbone, "hub_id": hub_id, "hub_filename": hub_filename, "revision": revision or "main"}
    return _key(hub_id or backbone, params)


def weights_file(cache_dir: str, model: dict) -> str:
    """<cache_dir>/weights/<key>/backbone.pt for a config's model entry."""
    key = weights_key(model["backbone"], model.get("hub_id"), model.get("hub_filename"), model.get("hub_revision"))
    return f"{cache_dir}/weights/{key}/backbone.pt"


def sample_data_dir(root: str, task: str, seed: int, version: int = SAMPLE_DATA_VERSION) -> str:
    """<root>/<task>/seed<seed>-v<version>: the generated dataset of one task."""
    return f"{root}/{task}/seed{int(seed)}-v{int(version)}"
