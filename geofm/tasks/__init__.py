"""The task registry: every downstream task the workflow knows, one module each.

A task is one module, geofm/tasks/<name>.py, that defines `TASK`, an instance of a
`geofm.tasks.base.Task` subclass: its on-disk layout check, split files and whether it needs a
selection hold-out, label names, how to draw a chip, its sample-data writer, its headline and key
metrics with their definitions; its TerraTorch recipe is config/tasks/<name>.yaml. Modules in
this package are found by name; a task shipped in another package registers itself under the
entry-point group `geofm.tasks` (`<name> = "package.module"`). Generic code (config schema,
rules, metrics, plots, summary) asks the registry and never names a task.

To add a task: copy geofm/tasks/landslide.py (binary segmentation) or biomass.py (regression),
write its recipe in config/tasks/<name>.yaml, and run `pytest tests/test_tasks.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from geofm.tasks.base import REGRESSION, SEGMENTATION, Task

__all__ = ["TASKS", "Task", "SEGMENTATION", "REGRESSION", "get"]


def _discover() -> dict[str, Task]:
    modules = [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
        if info.name != "base" and not info.name.startswith("_")
    ]
    modules += [ep.load() for ep in entry_points(group="geofm.tasks")]
    found: dict[str, Task] = {}
    for module in modules:
        task = getattr(module, "TASK", None)
        if not isinstance(task, Task):
            raise TypeError(f"{module.__name__}: a task module must define TASK, a geofm.tasks.base.Task")
        if task.name in found:
            raise ValueError(f"task {task.name!r} is defined twice ({module.__name__})")
        found[task.name] = task
    return dict(sorted(found.items()))


TASKS: dict[str, Task] = _discover()


def get(name: str) -> Task:
    return TASKS[name]
