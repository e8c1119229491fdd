# geofm-pipeline: fine-tune, evaluate and compare geospatial foundation models.
# Declarations and includes only; helpers live in rules/common.smk, logic in scripts/ and geofm/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/hpo.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/version.smk"


rule all:
    default_target: True
    input:
        final_targets(),
