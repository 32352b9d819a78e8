# Datasets: fetched once per data root on the submit host (compute nodes often have no
# internet). A root that already holds a prepared dataset (READY) needs no network.


rule download:
    output:
        f"{DATA}/{{dataset}}/READY",
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{EXP}/benchmarks/download/{{dataset}}.tsv"
    retries: 3
    localrule: True
    params:
        source=download_source,
        root=lambda wildcards, output: Path(output[0]).parent.parent,
    shell:
        "zsharp download {wildcards.dataset} --root {params.root} {params.source} > {log} 2>&1"
