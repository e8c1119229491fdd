"""Rule fetch_data: download a task's published dataset on the login node (tasks.<task>.download).

The files, their checksums and how they unpack come from geofm/tasks/downloads/<task>.yaml; the
dataset appears at its data_root only once every file is verified and the task's layout check passes.
"""

from pathlib import Path

from geofm import download, evidence
from geofm.tasks import TASKS

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    task = TASKS[sm.wildcards.task]
    settings = sm.params.downloads
    listed = settings["lists"].get(task.name) or download.task_list(task.name)
    default_base, entries = download.read_list(listed)
    cache = Path(sm.params.cache) / task.name
    download.fetch(
        entries,
        settings["base_urls"].get(task.name) or default_base,
        Path(sm.output[0]),
        cache,
        check=task.check_layout,
        trust_published=settings["trust_published"],
        pins=cache / "pins.json",
        timeout=tuple(settings["timeout"]),
        attempts=settings["attempts"],
    )
