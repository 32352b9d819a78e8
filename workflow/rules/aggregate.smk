# The table, the paired comparison, the plots, and an aggregate W&B run. A cell whose
# training failed for good (divergence) is recorded by its job and shows as FAILED here; a
# cell whose last attempt hit a transient fault shows as MISSING (the next run retrains it).
# The aggregate reads the grid's sweeps, comparison and published results from --grid: the
# parts of the config that say them (so a runtime or W&B setting reruns nothing).
from zsharp.pipeline.grid.expand import (
    EPSILON_PLOT,
    SENSITIVITY_PLOT,
    aggregate_document,
    sensitivity_plots,
)

SENSITIVITY = [
    (family, param, dataset, SENSITIVITY_PLOT.format(family=family, param=param, dataset=dataset))
    for family, param, dataset in sensitivity_plots(GRID)
]


rule aggregate:
    input:
        summaries=[f"{cell}/{folder.SUMMARY}" for cell in ALL_CELLS],
        evaluations=[f"{cell}/{folder.EVALUATION}" for cell in ALL_CELLS],
    output:
        table=report(
            f"{EXP}/results.csv",
            caption="../report/results.rst",
            category="Results",
            labels={"table": "per cell"},
        ),
        markdown=f"{EXP}/results.md",
        seeds=f"{EXP}/seeds.csv",
        comparison=report(
            f"{EXP}/comparison.csv",
            caption="../report/comparison.rst",
            category="Results",
            labels={"table": "paired comparison"},
        ),
        final=report(
            f"{EXP}/plots/final_accuracy.png",
            caption="../report/final_accuracy.rst",
            category="Plots",
            labels={"plot": "final accuracy"},
        ),
        sharpness=report(
            f"{EXP}/plots/accuracy_vs_sharpness.png",
            caption="../report/accuracy_vs_sharpness.rst",
            category="Plots",
            labels={"plot": "accuracy vs sharpness"},
        ),
        published=report(
            f"{EXP}/published.csv",
            caption="../report/published.rst",
            category="Results",
            labels={"table": "against published results"},
        ),
        sensitivity_table=f"{EXP}/sensitivity.csv",
        sensitivity=[
            report(
                f"{EXP}/plots/{name}",
                caption="../report/sensitivity.rst",
                category="Sensitivity",
                labels={"entry": family, "swept": param, "dataset": dataset},
            )
            for family, param, dataset, name in SENSITIVITY
        ],
        epsilon=[
            report(
                f"{EXP}/plots/{EPSILON_PLOT.format(dataset=d, model=m)}",
                caption="../report/accuracy_vs_epsilon.rst",
                category="Plots",
                labels={"plot": "accuracy vs ‖ε‖", "dataset": d, "model": m},
            )
            for d, m in DATASET_MODELS
        ],
        curves=[
            report(
                f"{EXP}/plots/curves_{d}_{m}.png",
                caption="../report/curves.rst",
                category="Curves",
                labels={"dataset": d, "model": m},
            )
            for d, m in DATASET_MODELS
        ],
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{EXP}/benchmarks/aggregate.tsv"
    localrule: True
    params:
        cells=lambda wildcards, input: shlex.join(str(Path(s).parent) for s in input.summaries),
        out=lambda wildcards, output: Path(output.table).parent,
        grid=shlex.quote(aggregate_document(config)),
        experiment=C["experiment"],
    shell:
        "zsharp aggregate {params.cells} --out {params.out} "
        "--grid {params.grid} --experiment {params.experiment} > {log} 2>&1"


onsuccess:
    report_failures()
