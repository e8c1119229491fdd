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
from geofm.tasks import TASKS

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


def render(recipe_text: str, settings: dict, paths: dict[str, str], notes: list[str] | None = None) -> dict:
    """Return the resolved TerraTorch config for one cell.

    settings: geofm.config.cell_settings(); paths: data_root, run_dir, splits_dir, ckpt_path.
    What the workflow had to add to the recipe (`ensure_contract`) is appended to `notes`.
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
    added = ensure_contract(config, TASKS[settings["task"]], paths["run_dir"])
    if notes is not None:
        notes.extend(added)
    return config


def with_best(settings: dict, best_file: Path) -> dict:
    """A cell's settings with the search's best parameters (hpo_best's best.json) over its overrides."""

    best = json.loads(Path(best_file).read_text())
    overrides = {**settings["overrides"], **{k: v for k, v in best["overrides"].items() if k != "set"}}
    if settings["overrides"].get("set") or best["overrides"].get("set"):
        overrides["set"] = {**settings["overrides"].get("set", {}), **best["overrides"].get("set", {})}
    return {**settings, "overrides": overrides, "searched": {"params": best["params"], "trial": best["number"]}}


def header(settings: dict, recipe: str, notes: list[str]) -> str:
    """The comment at the top of a cell's rendered config."""
    lines = [
        f"Cell {settings['task']} / {settings['model']} / seed {settings['seed']}, rendered from {recipe}.",
        "Run it by hand with: terratorch fit --config <this file>",
        "trainer.precision 'auto' and num_workers 'auto' are decided by the job for its hardware;",
        "config.effective.yaml beside this file is what actually ran.",
    ]
    if settings.get("searched"):
        searched = ", ".join(f"{k}={v}" for k, v in settings["searched"]["params"].items())
        lines.append(f"Searched (best trial {settings['searched']['trial']}): {searched}")
    if settings.get("allow_selection_on_reported_split"):
        lines.append("allow_selection_on_reported_split: true (a leak is not refused; outputs are marked LEAKY)")
    if notes:
        lines.append("Added by the workflow to the recipe:")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def _class_is(entry, name: str) -> bool:
    return isinstance(entry, dict) and str(entry.get("class_path", "")).split(".")[-1] == name.split(".")[-1]


def ensure_contract(config: dict, task, run_dir: str) -> list[str]:
    """Add what the workflow relies on and a user recipe may lack; say what was added or where
    a recipe writes outside the run's folder (the notes go into the rendered config's header).

    - a ModelCheckpoint callback monitoring the task's selection metric (else Lightning would
      keep the last epoch, silently);
    - a CSVLogger in the run folder, which the learning curves read (kept beside the recipe's own
      logger);
    - the run folder as Lightning's default_root_dir.
    """
    notes = []
    trainer = config.setdefault("trainer", {})
    if not trainer.get("default_root_dir"):
        trainer["default_root_dir"] = run_dir
        notes.append(f"trainer.default_root_dir: set to the run folder {run_dir}")
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, dict) else list(callbacks)
    monitored = [c for c in callbacks if _class_is(c, CHECKPOINT) and (c.get("init_args") or {}).get("monitor")]
    if not monitored:
        callbacks.append({
            "class_path": CHECKPOINT,
            "init_args": {"dirpath": f"{run_dir}/checkpoints", "filename": "best",
                          "monitor": task.selection_metric, "mode": task.selection_mode},
        })  # fmt: skip
        notes.append(
            f"trainer.callbacks: added a ModelCheckpoint monitoring {task.selection_metric} ({task.selection_mode}): "
            "the recipe had none with a monitor, and the last epoch is never taken silently"
        )
    else:
        where = (monitored[0].get("init_args") or {}).get("dirpath")
        if where and not str(where).startswith(run_dir):
            notes.append(f"trainer.callbacks: the recipe's checkpoints are written to {where}")
    trainer["callbacks"] = callbacks
    loggers = trainer.get("logger")
    loggers = [] if loggers in (None, False, True) else ([loggers] if isinstance(loggers, dict) else list(loggers))
    ours = [lg for lg in loggers if _class_is(lg, CSV_LOGGER)]
    if not ours:
        loggers.append({"class_path": CSV_LOGGER, "init_args": {"save_dir": run_dir, "name": "logs", "version": ""}})
        notes.append(f"trainer.logger: added a CSVLogger in {run_dir}/logs for the learning curves")
    else:
        where = (ours[0].get("init_args") or {}).get("save_dir")
        if where and not str(where).startswith(run_dir):
            notes.append(f"trainer.logger: the recipe's CSV logs are written to {where}; the curves are read there")
    trainer["logger"] = loggers[0] if len(loggers) == 1 else loggers
    return notes


def write(config: dict, path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"# {line}" for line in header.splitlines()) + "\n"
    text += yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)


def write_cell_config(settings: dict, recipe: Path, run_dir: Path, out: Path, best: Path | None = None) -> None:
    """A cell's (or a search's base) resolved TerraTorch config, written to `out` with its
    provenance header; the search's best parameters (`best`) win over the configured overrides."""
    if best:
        settings = with_best(settings, Path(best))
    paths = {
        "data_root": str(Path(settings["data_root"]).resolve()),
        "run_dir": str(Path(run_dir).resolve()),
        "splits_dir": str(Path(settings["splits_dir"]).resolve()),
        "ckpt_path": settings["weights"] or settings["weights_file"],
    }
    if paths["ckpt_path"]:
        paths["ckpt_path"] = str(Path(paths["ckpt_path"]).resolve())
    notes: list[str] = []
    config = render(Path(recipe).read_text(), settings, paths, notes)
    write(config, Path(out), header(settings, str(recipe), notes))
