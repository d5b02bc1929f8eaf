# Models: fetched or built once into resources/models/{model}/ (safetensors + tokenizer); then
# each run's model-dependent settings are checked against it before any heavy job.


localrules:
    prepare_model,
    check_run,


rule prepare_model:
    output:
        manifest=f"{RESOURCES}/models/{{model}}/lensspace-model.json",
        weights=f"{RESOURCES}/models/{{model}}/model.safetensors",
    params:
        spec=lambda wildcards: config["models"][wildcards.model],
        download_dir=lambda wildcards: f"{RESOURCES}/downloads/{wildcards.model}",
    log:
        f"{RESULTS}/logs/prepare_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_model/{{model}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/lensspace.yaml"
    script:
        "../scripts/prepare_model.py"


# The heavy rules take its output as ancient() input: they wait for the check, and a re-check
# after a settings edit reruns only the rules the edit feeds.
rule check_run:
    input:
        model=get_model_manifest,
    output:
        checked=f"{RESULTS}/{{run}}/checked.json",
    params:
        checks=get_model_checks,
    log:
        f"{RESULTS}/logs/check_run/{{run}}.log",
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/lensspace.yaml"
    script:
        "../scripts/check_run.py"
