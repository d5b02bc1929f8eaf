# The activation cache: every layer's residual for the run's tokens, written once.


rule cache_activations:
    input:
        tokens=rules.tokenize.output.tokens,
        model=get_model_manifest,
        checked=ancient(rules.check_run.output.checked),
    output:
        cache=directory(f"{RESULTS}/{{run}}/activations"),
    log:
        f"{RESULTS}/logs/cache_activations/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_activations/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        cache=config["cache"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/cache_activations.py"
