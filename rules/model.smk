# Models: fetched or built once into resources/models/{model}/ (safetensors + tokenizer).


localrules:
    prepare_model,


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
