# Datasets: fetched once per data root on the submit host (compute nodes often have no
# internet). A root that already holds a prepared dataset (READY) needs no network. A
# prepared dataset damaged since (common.smk checks each one's files against its meta.json
# when the workflow starts) has lost its READY and is prepared again here, before any
# training job reads it; training checks the files' digests too, and a damaged dataset it
# finds is prepared again by the next run.


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
