"""A cached snapshot of TerraTorch's backbone registry.

Importing TerraTorch takes ~8 s, too slow for every `snakemake --dry-run`. The snapshot is
taken once per installed TerraTorch version (in a subprocess) and read from a JSON file after.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _dump() -> dict:
    from terratorch.models.backbones import prithvi_vit
    from terratorch.registry import BACKBONE_REGISTRY

    names = {}
    for source, registry in BACKBONE_REGISTRY._sources.items():
        names[source] = sorted(registry)
    prithvi = {}
    for name, cfg in prithvi_vit.prithvi_cfgs.items():
        weights = prithvi_vit.pretrained_weights.get(name, {})
        prithvi[name] = {
            "depth": cfg["depth"],
            "hf_hub_id": weights.get("hf_hub_id"),
            "hf_hub_filename": weights.get("hf_hub_filename"),
        }
    return {"terratorch": metadata.version("terratorch"), "sources": names, "prithvi": prithvi}


def snapshot(cache_dir: Path) -> dict:
    version = metadata.version("terratorch")
    path = Path(cache_dir) / f"terratorch-registry-{version}.json"
    if path.is_file():
        return json.loads(path.read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTLY_DID_VERSION_CHECK": "True"}
    out = subprocess.run(
        [sys.executable, "-m", "geofm.backbones"], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"could not list TerraTorch backbones: {out.stderr.strip()[-500:]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(out.stdout)
    tmp.replace(path)
    return json.loads(out.stdout)


def _strip(name: str) -> tuple[str | None, str]:
    for source in ("terratorch", "timm"):
        if name.startswith(source + "_"):
            return source, name[len(source) + 1 :]
    return None, name


def is_backbone(snap: dict, name: str) -> bool:
    source, bare = _strip(name)
    sources = [source] if source else list(snap["sources"])
    return any(bare in snap["sources"].get(s, []) for s in sources)


def depth(snap: dict, name: str) -> int | None:
    _, bare = _strip(name)
    return snap["prithvi"].get(bare, {}).get("depth")


def hub_file(snap: dict, name: str) -> tuple[str | None, str | None]:
    _, bare = _strip(name)
    info = snap["prithvi"].get(bare, {})
    return info.get("hf_hub_id"), info.get("hf_hub_filename")


def suggest(snap: dict, name: str) -> list[str]:
    everything = [n for names in snap["sources"].values() for n in names]
    return difflib.get_close_matches(name, everything, n=3, cutoff=0.6)


if __name__ == "__main__":
    json.dump(_dump(), sys.stdout)
