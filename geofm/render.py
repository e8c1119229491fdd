"""Render a task's TerraTorch recipe into one cell's resolved LightningCLI config.

A recipe is a plain TerraTorch config with a few placeholders:
- a string that is exactly "${name}" becomes the value (any type, e.g. a list);
- "${name}" inside a longer string is replaced by its text.
Then the cell's overrides are set at their recipe paths (see geofm.config.OVERRIDE_PATHS).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from geofm.config import OVERRIDE_PATHS

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ValueError):
    pass


def substitute(node: Any, variables: dict[str, Any], where: str = "") -> Any:
    if isinstance(node, dict):
        return {k: substitute(v, variables, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        if whole:
            return _lookup(variables, whole.group(1), where)
        return PLACEHOLDER.sub(lambda m: str(_lookup(variables, m.group(1), where)), node)
    return node


def _lookup(variables: dict, name: str, where: str) -> Any:
    if name not in variables:
        known = ", ".join(sorted(variables))
        raise RecipeError(f"{where}: unknown placeholder ${{{name}}}; fix: use one of {known}")
    return variables[name]


def set_path(config: dict, dotted: str, value: Any) -> None:
    """Set config[a][b][c] for 'a.b.c'; list items are addressed by index ('callbacks.0')."""
    keys = dotted.split(".")
    node: Any = config
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if keys[i + 1].isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def render(recipe_text: str, settings: dict, paths: dict[str, str]) -> dict:
    """Return the resolved TerraTorch config for one cell.

    settings: geofm.config.cell_settings(); paths: data_root, run_dir, splits_dir, ckpt_path.
    """
    recipe = yaml.safe_load(recipe_text)
    if not isinstance(recipe, dict) or "model" not in recipe or "data" not in recipe:
        raise RecipeError("recipe: not a TerraTorch LightningCLI config (needs 'data' and 'model')")
    variables = {
        "backbone": settings["backbone"],
        "pretrained": settings["pretrained"],
        "ckpt_path": paths.get("ckpt_path"),
        "neck_indices": settings["neck_indices"],
        "seed": settings["seed"],
        **{k: v for k, v in paths.items() if k != "ckpt_path"},
    }
    config = substitute(recipe, variables)
    config["seed_everything"] = settings["seed"]
    trainer = settings["trainer"]
    set_path(config, "trainer.accelerator", trainer["accelerator"])
    set_path(config, "trainer.devices", trainer["devices"])
    # 'auto' precision depends on the GPU the job lands on: the job decides (config.effective.yaml).
    if trainer["precision"] != "auto":
        set_path(config, "trainer.precision", trainer["precision"])
    overrides = dict(settings["overrides"])
    extra = overrides.pop("set", {})
    for key, value in overrides.items():
        set_path(config, OVERRIDE_PATHS[key], value)
    for dotted, value in extra.items():
        set_path(config, dotted, value)
    return config


def write(config: dict, path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"# {line}" for line in header.splitlines()) + "\n"
    # json round trip: a config Snakemake read from JSON holds OrderedDicts, which safe_dump refuses
    text += yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)
    path.write_text(text)
