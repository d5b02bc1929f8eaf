# Data: fetch and clean a corpus once, then tokenize it per run into fixed-length sequences.


localrules:
    prepare_corpus,


rule prepare_corpus:
    output:
        text=f"{RESOURCES}/corpora/{{corpus}}.txt",
    log:
        f"{RESULTS}/logs/prepare_corpus/{{corpus}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        spec=lambda wildcards: config["corpora"][wildcards.corpus],
        download_dir=lambda wildcards: f"{RESOURCES}/downloads/{wildcards.corpus}",
    script:
        "../scripts/prepare_corpus.py"


rule tokenize:
    input:
        corpus=get_corpus_text,
        model=get_model_manifest,
    output:
        tokens=f"{RESULTS}/{{run}}/data/tokens.safetensors",
        meta=f"{RESULTS}/{{run}}/data/tokens.json",
    log:
        f"{RESULTS}/logs/tokenize/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        split=get_token_split,
    script:
        "../scripts/tokenize_corpus.py"
