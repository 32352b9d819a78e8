# The ZSharp comparison: download → train → evaluate → aggregate for every
# dataset × model × optimizer × seed cell of the config. All logic lives in the `zsharp`
# package; the rules only expand the grid and call its command line.
#
#   snakemake --cores all                                   # config/config.yaml, anywhere
#   snakemake --configfile config/paper.yaml --cores all --resources gpu=8
#   snakemake --profile workflow/profiles/slurm --configfile config/paper.yaml
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"


# every job runs in this image under --sdm apptainer (or docker through Snakemake)
container: C["container"]


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
