# Lenses: trained here (least squares + KL) or loaded pretrained; written in tuned-lens format.


localrules:
    fetch_lens,


rule train_lens:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
    output:
        config=f"{RESULTS}/{{run}}/lens/config.json",
        params=f"{RESULTS}/{{run}}/lens/params.pt",
    log:
        f"{RESULTS}/logs/train_lens/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_lens/{{run}}.tsv"
    wildcard_constraints:
        run=get_runs_with_lens_source("train"),
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    params:
        training=get_lens_training,
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/train_lens.py"


rule fetch_lens:
    input:
        model=get_model_manifest,
        lens=get_pretrained_lens_files,
    output:
        config=f"{RESULTS}/{{run}}/lens/config.json",
        params=f"{RESULTS}/{{run}}/lens/params.pt",
    log:
        f"{RESULTS}/logs/fetch_lens/{{run}}.log",
    wildcard_constraints:
        run=get_runs_with_lens_source("pretrained"),
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        lens_id=lambda wildcards: get_run(wildcards.run)["lens"]["id"],
        allow_other_model=lambda wildcards: get_run(wildcards.run)["lens"]["allow_other_model"],
    script:
        "../scripts/fetch_lens.py"


rule eval_lens:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
    output:
        table=f"{RESULTS}/{{run}}/lens_eval.tsv",
    log:
        f"{RESULTS}/logs/eval_lens/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_lens/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    params:
        n_boot=config["bootstrap"]["n_resamples"],
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/eval_lens.py"


rule lens_figure:
    input:
        table=rules.eval_lens.output.table,
    output:
        figure=report(
            f"{RESULTS}/figures/lens_{{run}}.png",
            caption="../report/lens_quality.rst",
            category="Lens quality",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "lens quality"},
        ),
    log:
        f"{RESULTS}/logs/lens_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/lens_figure.py"


register_experiment(
    "lens",
    section="lensspace.report.lens",
    files={"lens_eval": rules.eval_lens.output.table, "figure": rules.lens_figure.output.figure},
)
