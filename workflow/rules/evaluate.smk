# Test accuracy and loss, calibration (ECE) and sharpness (top Hessian eigenvalue) of
# every trained cell.


rule evaluate:
    input:
        summary=f"{EXP}/cells/{CELL}/{folder.SUMMARY}",
        data=ancient(f"{DATA}/{{dataset}}/READY"),
    output:
        f"{EXP}/cells/{CELL}/{folder.EVALUATION}",
    log:
        f"{LOGS}/evaluate/{CELL}.log",
    benchmark:
        f"{EXP}/benchmarks/evaluate/{CELL}.tsv"
    retries: retries("evaluate")
    threads: resource("evaluate", "threads", 1)
    resources:
        **gpu_resources("evaluate"),
        runtime=resource("evaluate", "runtime", 60),
        mem_mb=resource("evaluate", "mem_mb", 8000),
    params:
        cell=lambda wildcards, input: Path(input.summary).parent,
        data=lambda wildcards, input: Path(input.data).parent.parent,
        options=evaluate_options(),
    shell:
        "zsharp-device --cells-per-gpu {resources.cells_per_gpu} --mem-mb {resources.gpu_mem_mb} "
        "{resources.gpus_per_cell} -- "
        "zsharp evaluate --cell {params.cell} --data-root {params.data} {params.options} "
        ">> {log} 2>&1"
