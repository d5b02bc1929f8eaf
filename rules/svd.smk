# SVD bases of the unembedding (raw and centred with the final norm's gain folded in).


rule svd:
    input:
        model=get_model_manifest,
    output:
        bases=f"{RESULTS}/{{run}}/svd/bases.safetensors",
        spectrum=f"{RESULTS}/{{run}}/svd/spectrum.tsv",
    log:
        f"{RESULTS}/logs/svd/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/svd/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    script:
        "../scripts/svd.py"


register_experiment("svd", files={"spectrum": rules.svd.output.spectrum})
