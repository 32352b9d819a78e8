# One training job per cell. `params.cell` is the cell's whole resolved configuration, so
# changing any hyperparameter of a cell reruns that cell only. A failure that would recur
# (a non-finite loss, a configuration that cannot be built) is recorded as the cell's
# (failed) result. A transient fault (I/O, out of memory, a killed process) is no result:
# the job fails and Snakemake retries it; the last attempt writes it down as transient, so
# the grid and its table go on (the cell shows as MISSING) and, through `failures`, the next
# run trains the cell again. The resumable checkpoint lives beside the outputs but is not
# one (Snakemake deletes declared outputs before a job runs): a killed or preempted job
# started again continues from it.


rule train:
    input:
        data=ancient(f"{DATA}/{{dataset}}/READY"),
    output:
        summary=f"{EXP}/cells/{CELL}/{folder.SUMMARY}",
        metrics=f"{EXP}/cells/{CELL}/{folder.METRICS}",
    log:
        f"{LOGS}/train/{CELL}.log",
    benchmark:
        f"{EXP}/benchmarks/train/{CELL}.tsv"
    retries: retries("train")
    threads: resource("train", "threads", 1)
    resources:
        **gpu_resources("train"),
        runtime=resource("train", "runtime", 720),
        mem_mb=resource("train", "mem_mb", 8000),
        attempt=lambda wildcards, attempt: attempt,
    params:
        cell=lambda wildcards: cell_of(wildcards).config_json(),
        matched=matched_flag,
        out=lambda wildcards, output: Path(output.summary).parent,
        data=lambda wildcards, input: Path(input.data).parent.parent,
        failures=failures_so_far,
        attempts=retries("train") + 1,
    shell:
        "zsharp-device --cells-per-gpu {resources.cells_per_gpu} --mem-mb {resources.gpu_mem_mb} "
        "{resources.gpus_per_cell} -- "
        "zsharp train --config {params.cell:q} --out {params.out} --data-root {params.data} "
        "--label {wildcards.label} --key {wildcards.dataset}/{wildcards.model}/"
        "{wildcards.label}/seed{wildcards.seed} "
        "{params.matched} "
        "--threads {threads} --processes {resources.processes} --progress lines --record-failure "
        "--attempt {resources.attempt} {params.attempts} >> {log} 2>&1"
