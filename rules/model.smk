# Models: fetched or built once into resources/models/{model}/ (safetensors + tokenizer); then
# each run's model-dependent settings are checked against it before any heavy job.


localrules:
    prepare_model,
    check_run,


rule prepare_model:
    output:
        manifest=MODEL_MANIFEST,
        weights=f"{RESOURCES}/models/{{model}}/model.safetensors",
    log:
        f"{RESULTS}/logs/prepare_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_model/{{model}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=lambda wildcards: config["models"][wildcards.model],
        download_dir=lambda wildcards: f"{RESOURCES}/downloads/{wildcards.model}",
    script:
        "../scripts/prepare_model.py"


# The heavy rules (cache_activations, the layer rules, h1_heads) take its output as ancient()
# input: they wait for it. No params on purpose: a params change would rerun it, and Snakemake skips
# the params check of jobs downstream of one it reruns (expecting them to rerun anyway), so a
# rerun check would hide an edit from the heavy rule it feeds. The script reads the settings
# from the config; once the model is prepared, later edits are checked at parse time.
rule check_run:
    input:
        model=get_model_manifest,
    output:
        checked=f"{RESULTS}/{{run}}/checked.json",
    log:
        f"{RESULTS}/logs/check_run/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/check_run.py"


register_experiment(
    "model",
    files={"manifest": MODEL_MANIFEST},
    items={"model": lambda run: [get_run(run)["model"]]},
)
