# One training job per cell. `params.cell` is the cell's whole resolved configuration, so
# changing any hyperparameter of a cell reruns that cell only. The resumable checkpoint
# lives beside the outputs but is not one (Snakemake deletes declared outputs before a
# job runs): a killed or preempted job started again continues from it.


rule train:
    input:
        data=ancient(f"{DATA}/{{dataset}}/READY"),
    output:
        summary=f"{EXP}/cells/{CELL}/summary.json",
        metrics=f"{EXP}/cells/{CELL}/metrics.jsonl",
    log:
        f"{LOGS}/train/{CELL}.log",
    benchmark:
        f"{EXP}/benchmarks/train/{CELL}.tsv"
    params:
        cell=lambda wc: shlex.join(train_arguments(cell_of(wc))),
        out=lambda wildcards, output: Path(output.summary).parent,
        data=lambda wildcards, input: Path(input.data).parent.parent,
        attempt=failures_so_far,
        runtime=shlex.join(
            ["--device", C["runtime"]["device"], "--amp", C["runtime"]["amp"]]
            + (["--compile"] if C["runtime"]["compile"] else [])
        ),
        wandb=wandb_args(),
    threads: resource("train", "threads", 1)
    resources:
        gpu=resource("train", "gpu", 1),
        runtime=resource("train", "runtime", 720),
        mem_mb=resource("train", "mem_mb", 8000),
        **({"gpu_model": resource("train", "gpu_model", None)} if resource("train", "gpu_model", None) else {}),
    retries: 2
    container:
        CONTAINER
    shell:
        "zsharp-device {resources.gpu} -- "
        "zsharp train {params.cell} --out {params.out} --data-root {params.data} "
        "--threads {threads} --progress lines --record-failure {params.runtime} "
        "{params.wandb} > {log} 2>&1"
