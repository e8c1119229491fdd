"""Command-line entry points (pyproject [project.scripts]): geofm-submit, geofm-wait, geofm-watcher, geofm-compare."""
