"""Load, validate and resolve an experiment config.

Every problem is reported as one line naming the key and the fix (ConfigError), before any
job is planned. Used by the Snakefile, the CI validate stage and the COS watcher.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import jsonschema
import yaml

from geofm import backbones, sample_data
from geofm.tasks import TASKS

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "config" / "schema.yaml"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always used with fullmatch
MAX_CELLS = 10_000  # cells per experiment unless the operator allows more (refused before planning)
MAX_CONFIG_BYTES = 256 * 1024  # a submitted config larger than this is refused unread
OVERRIDE_PATHS = {
    "max_epochs": "trainer.max_epochs",
    "batch_size": "data.init_args.batch_size",
    "lr": "optimizer.init_args.lr",
    "weight_decay": "optimizer.init_args.weight_decay",
    "freeze_backbone": "model.init_args.freeze_backbone",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
}


class ConfigError(ValueError):
    """A config problem, phrased as one line: '<key>: <problem>; fix: <what to do>'."""


class Cell(NamedTuple):
    """One task x model x seed: the unit of fine-tuning, evaluation and plotting (where its files
    live: geofm.layout.ResultsLayout)."""

    task: str
    model: str
    seed: int


def _defaulting_validator():
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def schema() -> dict:
    """config/schema.yaml with the task-keyed parts filled in from the task registry."""
    doc = yaml.safe_load(SCHEMA_PATH.read_text())
    tasks = doc["properties"]["tasks"]
    model = doc["$defs"]["model"]["properties"]
    for name, task in TASKS.items():
        sub = copy.deepcopy(doc["$defs"]["task"])
        sub["properties"]["enabled"]["default"] = task.default_enabled
        tasks["properties"][name] = {**sub, "default": {}, "description": f"{task.title}."}
        model["task_overrides"]["properties"][name] = {"$ref": "#/$defs/overrides"}
        doc["properties"]["hpo"]["properties"]["task_space"]["properties"][name] = {
            "type": "object",
            "description": f"{task.title}: changes to the search space.",
        }
        model["reference"]["properties"][name] = {"$ref": "#/$defs/reference"}
    return doc


def _error_line(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        allowed = sorted(error.schema.get("properties", {}))
        hint = f"allowed keys: {', '.join(allowed)}" if allowed else "remove it"
        return f"{key}: unknown key {', '.join(repr(e) for e in extra)}; fix: {hint}"
    if error.validator == "required":
        return f"{key}: {error.message}; fix: add it (see config/schema.yaml)"
    description = error.schema.get("description", "").strip().split(". ")[0]
    fix = f"expected {description}" if description else "see config/schema.yaml"
    return f"{key}: {error.message}; fix: {fix}"


def validate_schema(raw: dict) -> dict:
    """Validate against config/schema.yaml and fill in defaults (returns a new dict)."""
    config = copy.deepcopy(raw) if raw else {}
    _refuse_non_finite(config, "")
    validator = _defaulting_validator()(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_error_line(best))
    # Defaults were filled in while validating; a second pass validates the filled-in values.
    validator.validate(config)
    return config


def _refuse_non_finite(node, key: str) -> None:
    """NaN and infinities pass JSON-schema bounds unnoticed (nan > 0 is False): refuse them."""
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key or '(top level)'}: {node} is not a finite number; fix: give a finite value")
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_non_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_non_finite(v, f"{key}[{i}]")


def _check_cell_count(raw: dict, max_cells: int) -> None:
    """Refuse an experiment with too many cells before validating or planning anything."""
    seeds, models, tasks = raw.get("seeds", [0]), raw.get("models") or {"default": None}, raw.get("tasks") or {}
    if not isinstance(seeds, list) or not isinstance(models, dict) or not isinstance(tasks, dict):
        return  # the schema reports the type
    n_tasks = sum(
        1 for name, task in TASKS.items()
        if (tasks.get(name) or {}).get("enabled", task.default_enabled) if isinstance(tasks.get(name) or {}, dict)
    )  # fmt: skip
    n_cells = len(seeds) * len(models) * n_tasks
    if n_cells > max_cells:
        raise ConfigError(
            f"seeds x models x tasks: {len(seeds)} x {len(models)} x {n_tasks} = {n_cells} cells, more than the "
            f"{max_cells} allowed; fix: split the experiment (or ask the operator to raise the limit)"
        )


def _check_name(key: str, value: str) -> None:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(
            f"{key}: {value!r} is not a safe folder name; fix: use 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )


# Top-level entries a run may write into (everything else in the workflow folder is code).
OUTPUT_ENTRIES = ("results", "scratch", "resources")
ALWAYS_PROTECTED = (".git", ".dvc", ".venv", ".tools", ".snakemake")


def _protected_entries(folder: Path) -> set[str]:
    """Top-level entries of a workflow folder that outputs must never touch: what git tracks
    (or, outside a git checkout, whatever is there) and the tool folders, except results/ etc."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(folder), "ls-files", "-z"], capture_output=True, timeout=30, check=True
        ).stdout.decode()
        names = {f.split("/", 1)[0] for f in listed.split("\0") if f}
    except (OSError, subprocess.SubprocessError):
        names = set()
    if not names:
        names = {p.name for p in folder.iterdir()}
    return (names | set(ALWAYS_PROTECTED)) - set(OUTPUT_ENTRIES)


def _check_outputs(config: dict, root: Path) -> None:
    """Outputs may not overlap the workflow's own files (a results commit would replace them): the
    code that runs (REPO_ROOT), and the run folder when it is a checkout of the workflow (the
    watcher resolves a submitted commit's config from its own installation)."""
    folders = {REPO_ROOT.resolve()}
    if (root / ".git").exists() and (root / "Snakefile").is_file():
        folders.add(root.resolve())
    outputs = [
        ("results_dir", Path(config["results_dir"]) / config["experiment"]),
        ("scratch_dir", Path(config["scratch_dir"]) / config["experiment"]),
        ("cache_dir", Path(config["cache_dir"])),
        ("sample_data.root", Path(config["sample_data"]["root"])),
    ]
    for repo in sorted(folders):
        protected = None
        for key, path in outputs:
            target = (root / path).resolve()
            if target == repo or repo.is_relative_to(target):
                raise ConfigError(
                    f"{key}: {path} would hold the workflow's own folder {repo}; fix: use a folder such as "
                    f"{OUTPUT_ENTRIES[0] if key == 'results_dir' else 'scratch'}/ (the default)"
                )
            if target.is_relative_to(repo):
                first = target.relative_to(repo).parts[0]
                protected = _protected_entries(repo) if protected is None else protected
                if first in protected:
                    raise ConfigError(
                        f"{key}: {path} overlaps the workflow's own {first!r}; fix: keep outputs under "
                        f"{', '.join(e + '/' for e in OUTPUT_ENTRIES)} or outside the workflow folder"
                    )


def resolve(raw: dict, root: Path | str = ".", check_data: bool = True, max_cells: int = MAX_CELLS) -> dict:
    """Validate a config and resolve paths and defaults; raise ConfigError on the first problem.

    `max_cells` bounds task x model x seed before anything is planned (the watcher's operator
    may allow more).
    """
    root = Path(root)
    _check_cell_count(raw or {}, max_cells)
    config = validate_schema(raw)
    _check_name("experiment", config["experiment"])
    for name in config["models"]:
        _check_name(f"models.{name}", name)
    _check_outputs(config, root)
    enabled = [t for t in TASKS if config["tasks"][t]["enabled"]]
    if not enabled:
        raise ConfigError("tasks: every task is disabled; fix: set enabled: true for at least one")
    sample = config["sample_data"]
    for task in TASKS:
        settings = config["tasks"][task]
        # Generated data is keyed by what makes it: the task, the seed and the generator's version.
        generated = f"{sample['root']}/{task}-seed{sample['seed']}-v{sample_data.GENERATOR_VERSION}"
        settings["sample"] = not settings["download"] and settings["data_root"] in (None, generated)
        if settings["download"] and settings["data_root"] is not None:
            raise ConfigError(
                f"tasks.{task}.download: downloads go to <cache_dir>/datasets/{task}; fix: remove "
                f"tasks.{task}.data_root, or download: true to use the dataset already at data_root"
            )
        if settings["data_root"] is None:
            settings["data_root"] = f"{config['cache_dir']}/datasets/{task}" if settings["download"] else generated
        if settings["recipe"] is None:  # the bundled recipe, wherever the run directory is
            settings["recipe"] = str(TASKS[task].recipe)
        if settings["enabled"]:
            recipe = root / settings["recipe"]
            if not recipe.is_file():
                raise ConfigError(
                    f"tasks.{task}.recipe: {settings['recipe']} does not exist; fix: point it at "
                    "a TerraTorch config or remove the key to use the default recipe"
                )
            fetched_later = settings["download"] and not (root / settings["data_root"]).exists()
            if check_data and not settings["sample"] and not fetched_later:
                problem = TASKS[task].check_layout(root / settings["data_root"])
                if problem:
                    raise ConfigError(f"tasks.{task}.data_root: {problem}")
    known = backbones.snapshot(root / config["cache_dir"])
    for name, model in config["models"].items():
        key = f"models.{name}"
        if not backbones.is_backbone(known, model["backbone"]):
            close = backbones.suggest(known, model["backbone"])
            raise ConfigError(
                f"{key}.backbone: {model['backbone']!r} is not in TerraTorch's backbone registry; "
                f"fix: use a registered name{' such as ' + ', '.join(close) if close else ''}"
            )
        if model["weights"] is not None:
            if not model["pretrained"]:
                raise ConfigError(
                    f"{key}.weights: a weights file is given but pretrained is false; fix: set "
                    f"{key}.pretrained: true or remove weights"
                )
            if not (root / model["weights"]).is_file():
                raise ConfigError(
                    f"{key}.weights: file {model['weights']} does not exist; fix: give the path "
                    "of a local backbone checkpoint (relative to the workflow folder) or use hub_id"
                )
        if model["pretrained"] and model["weights"] is None:
            default_id, default_file = backbones.hub_file(known, model["backbone"])
            model["hub_id"], model["hub_filename"] = (
                model["hub_id"] or default_id,
                model["hub_filename"] or default_file,
            )
            if not model["hub_id"] or not model["hub_filename"]:
                raise ConfigError(
                    f"{key}: pretrained weights of {model['backbone']!r} have no known download; fix: set "
                    f"{key}.hub_id and {key}.hub_filename, or {key}.weights: <local file>"
                )
        if model["neck_indices"] is None:
            depth = backbones.depth(known, model["backbone"])
            if depth is None:
                raise ConfigError(
                    f"{key}.neck_indices: not set and {model['backbone']} is not a Prithvi "
                    "backbone with a known depth; fix: list the encoder layers to feed the decoder"
                )
            model["neck_indices"] = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    unknown = sorted(set(config["hpo"]["model_space"]) - set(config["models"]))
    if unknown:
        raise ConfigError(
            f"hpo.model_space: {unknown[0]!r} is not a model of this experiment; fix: use a key of models"
        )
    config["enabled_tasks"] = enabled
    return config


def parse_untrusted(data: bytes, where: str = "config", max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A config that arrived from outside (a bucket, a submitted commit), as plain data.

    Refused with one line (ConfigError): more than `max_bytes`, not UTF-8, not YAML, not a
    mapping, any anchor or alias (alias bombs; and what is checked must be what runs), and
    `__use_yte__` (Snakemake would evaluate `?expr` values as Python). The result is plain
    JSON-compatible data: write it as JSON (`write_json`) and pass that file to Snakemake,
    which never evaluates JSON config files.
    """
    if len(data) > max_bytes:
        raise ConfigError(f"{where}: {len(data)} bytes, more than the {max_bytes} allowed; fix: trim the config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text; fix: save the config as UTF-8") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(
                    f"{where}: YAML anchors and aliases are not accepted in a submitted config; "
                    "fix: write the values out in full"
                )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]}); fix: correct the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a mapping of settings; fix: see config/schema.yaml")
    if "__use_yte__" in raw or "__definitions__" in raw:
        raise ConfigError(
            f"{where}: __use_yte__: YTE templates (Python in '?' values) are not accepted in a submitted "
            "config; fix: write plain values"
        )
    try:  # plain data only: anything that does not survive JSON is refused
        return json.loads(json.dumps(raw, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: holds values that are not plain data ({e}); fix: use strings and numbers"
        ) from None


def write_json(config: dict, path: Path | str) -> Path:
    """The validated config as JSON, the form handed to Snakemake (no YAML, no YTE)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def load(path: Path | str, root: Path | str = ".", check_data: bool = True) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; fix: pass an existing --configfile") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix: correct the syntax") from None
    return resolve(raw, root, check_data)


def cells(config: dict) -> list[Cell]:
    return [
        Cell(task, model, seed)
        for task in config["enabled_tasks"]
        for model in config["models"]
        for seed in config["seeds"]
    ]


def search_space(config: dict, task: str, model: str) -> dict:
    """The search space of a task x model: the default, the config's space, the task's, the model's."""
    from geofm import hpo

    h = config["hpo"]
    try:
        return hpo.merge_space(hpo.DEFAULT_SPACE, h["space"], h["task_space"].get(task), h["model_space"].get(model))
    except hpo.SearchError as e:
        raise ConfigError(f"{e} (task {task}, model {model})") from None


def cell_settings(config: dict, task: str, model: str, seed: int) -> dict:
    """Everything that defines one cell's fine-tune: the render step's parameters.

    Only these values reach a cell's rendered config, so changing another model's or
    another task's settings leaves this cell untouched.
    """
    m = config["models"][model]
    overrides: dict = {}
    for layer in (
        config["tasks"][task]["overrides"],
        m["overrides"],
        m["task_overrides"].get(task, {}),
    ):
        for key, value in layer.items():
            if key == "set":
                overrides.setdefault("set", {}).update(value)
            else:
                overrides[key] = value
    return {
        "task": task,
        "model": model,
        "seed": seed,
        "backbone": m["backbone"],
        "pretrained": m["pretrained"],
        "weights": m["weights"],
        "hub": bool(m["pretrained"] and m["weights"] is None),
        "neck_indices": m["neck_indices"],
        "data_root": config["tasks"][task]["data_root"],
        "trainer": config["trainer"],
        "overrides": overrides,
        "allow_selection_on_reported_split": config["tasks"][task]["allow_selection_on_reported_split"],
    }


def describe(doc: dict | None = None) -> str:
    """config/README.md: every key of the schema with its type, default and meaning (Markdown),
    as the Snakemake workflow catalog renders it. Written by `python -m geofm.config`; a test
    keeps the committed file equal to this."""
    doc = doc or schema()
    defs = doc["$defs"]
    lines = [
        "# Configuration",
        "",
        "One experiment is one config file: `config/config.yaml` by default, or any file given with",
        "`--configfile`. It is validated against `config/schema.yaml` (and TerraTorch's backbone",
        "registry, the dataset layouts and the weights files) before any job is planned; a problem stops",
        "the run with one line naming the key and the fix. Keys left out take the defaults below.",
        "Task-keyed sections list every registered task (geofm/tasks/).",
        "",
        "This page is generated from the schema: `python -m geofm.config > config/README.md`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]

    def kind(node: dict) -> str:
        if "$ref" in node:
            return kind(defs[node["$ref"].split("/")[-1]])
        if "oneOf" in node:
            return " or ".join(kind(n) if "const" not in n else repr(n["const"]) for n in node["oneOf"])
        t = node.get("type", "object")
        return " or ".join(t) if isinstance(t, list) else t

    def default(node: dict) -> str:
        return f"`{json.dumps(node['default'])}`" if "default" in node else ""

    def walk(node: dict, prefix: str) -> None:
        node = {**defs.get(node.get("$ref", "#/x/").split("/")[-1], {}), **node}
        if prefix in ("tasks.", "models.<name>.task_overrides.", "models.<name>.reference.", "hpo.task_space."):
            sub = next(iter(node["properties"].values()), {})  # the same for every task
            names = ", ".join(f"`{n}`" + ("" if t.default_enabled else " (off by default)") for n, t in TASKS.items())
            lines.append(f"| `{prefix}<task>` | {kind(sub)} | | One entry per task: {names}. |")
            if prefix == "tasks.":
                walk(defs["task"], "tasks.<task>.")
            return
        for key, sub in node.get("properties", {}).items():
            merged = {**defs.get(sub.get("$ref", "#/x/").split("/")[-1], {}), **sub}
            text = " ".join(str(merged.get("description", "")).split()).replace("|", "\\|")
            lines.append(f"| `{prefix}{key}` | {kind(sub)} | {default(sub)} | {text} |")
            if merged.get("properties") and key not in ("overrides",):
                walk(merged, f"{prefix}{key}.")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra.get("$ref"):
            name = extra["$ref"].split("/")[-1]
            walk(defs[name], f"{prefix}<name>.")

    walk(doc, "")
    lines += ["", "Training overrides (`tasks.<task>.overrides`, `models.<name>.overrides`, "
              "`models.<name>.task_overrides.<task>`; later ones win):", "",
              "| key | type | meaning |", "|---|---|---|"]  # fmt: skip
    for key, sub in defs["overrides"]["properties"].items():
        text = " ".join(str(sub.get("description", "")).split())
        lines.append(f"| `{key}` | {kind(sub)} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(describe())
