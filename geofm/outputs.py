"""Every experiment-level output, written from the cells' files through the results layout:
summary, statistics across seeds, ranking, per-class scores, cost ledger, learning curves,
provenance manifest and the report's front page. One cheap step: the `summarize` rule runs it
when every cell finished, the workflow's onerror handler when some did not (marking them)."""

from __future__ import annotations

from geofm import manifest, overview, plots, summary, tables
from geofm.layout import ResultsLayout


def write_all(layout: ResultsLayout, cells, settings: dict) -> dict:
    """settings: experiment (name, description), tasks, bootstrap, references, dpi, provenance."""
    document = summary.write(layout, cells, settings["experiment"])
    aggregate = tables.write_aggregate(layout, cells, settings["bootstrap"], settings["references"])
    total = tables.write_cost(layout, document["rows"])
    plots.write_curves(layout, cells, settings["dpi"])
    provenance = manifest.write(layout, cells, settings["tasks"], settings["provenance"])
    overview.write(layout, settings["experiment"], cells, aggregate, document, total, provenance["lock"])
    return document
