"""Rules version / version_evidence: dvc add the experiment's results and prepare the results commit (no push)."""

from pathlib import Path

from geofm import evidence, versioning

sm = snakemake  # noqa: F821 (provided by Snakemake)
with evidence.captured(sm.log[0]):
    versioning.prepare(
        Path.cwd(),
        Path(sm.params.exp_dir),
        experiment=sm.params.experiment,
        outcome=sm.params.outcome,
        settings=dict(sm.params.settings),
        receipt=Path(sm.output[0]),
        log=lambda line: print(line, flush=True),
    )
