# Versioning (versioning.enabled, set by the watcher): the experiment's large results are
# added to DVC's cache, its small text results committed to git, on the fetched branch tip
# (geofm/versioning.py). Nothing is pushed here: this runs as submitted code, without
# credentials. The watcher checks the prepared commit and pushes it and the DVC objects.
#
# A run whose cells all succeed reaches `version` through the default target. When a cell
# fails, Snakemake cannot run anything that depends on the failed cell, so `version` never
# runs; the onerror handler (rules/report.smk) writes the summary marking the failed cells,
# and a second call versions that evidence (error files, summary, logs, whatever finished):
#     snakemake version_evidence --force ...
# `version_evidence` has no inputs, so it runs whatever failed before it.
# Their logs and receipts live in scratch: results/<experiment>/logs/ is among what they
# version, so nothing may write there while they run.


localrules:
    version,
    version_evidence,


rule version:
    """Every output exists: dvc add the large results, commit the small text (no push)."""
    input:
        [t for t in final_targets() if not t.startswith(f"{L.scratch}/versioning/")],
    output:
        f"{L.scratch}/versioning/version.json",
    log:
        f"{L.scratch}/versioning/version.log",
    conda:
        "../envs/geofm.yaml"
    params:
        exp_dir=lambda w: L.root,
        experiment=NAME,
        outcome="succeeded",
        settings=EXP["versioning"],
    script:
        "../scripts/version_results.py"


rule version_evidence:
    """What a failed run left behind (error files, summary, logs, finished cells), prepared the same way."""
    output:
        f"{L.scratch}/versioning/evidence.json",
    log:
        f"{L.scratch}/versioning/evidence.log",
    conda:
        "../envs/geofm.yaml"
    params:
        exp_dir=L.root,
        experiment=NAME,
        outcome="failed",
        settings=EXP["versioning"],
    script:
        "../scripts/version_results.py"
