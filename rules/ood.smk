# Out of distribution: each run's eval_corpora, tokenized with the run's tokenizer (never trained
# on), then the lens's KL per layer and the seed-layout H0 cells on them; one table and figure per run.


rule ood_tokenize:
    input:
        corpus=rules.prepare_corpus.output.text,
        model=get_model_manifest,
        train=rules.tokenize.output.tokens,
    output:
        tokens=f"{RESULTS}/{{run}}/ood/{{corpus}}/tokens.safetensors",
        sample=f"{RESULTS}/{{run}}/ood/{{corpus}}/sample.tsv",
    log:
        f"{RESULTS}/logs/ood_tokenize/{{run}}/{{corpus}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        seq_len=lambda wildcards: get_token_split(wildcards)["seq_len"],
        seed=config["seed"],
        ood=config["ood"],
        source=lambda wildcards: config["corpora"][wildcards.corpus]["source"],
    script:
        "../scripts/ood_tokenize.py"


rule ood:
    input:
        tokens=rules.ood_tokenize.output.tokens,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
    output:
        lens_eval=f"{RESULTS}/{{run}}/ood/{{corpus}}/lens_eval.tsv",
        ablation=f"{RESULTS}/{{run}}/ood/{{corpus}}/ablation.tsv",
        sequences=f"{RESULTS}/{{run}}/ood/{{corpus}}/per_sequence.tsv",
    log:
        f"{RESULTS}/logs/ood/{{run}}/{{corpus}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ood/{{run}}/{{corpus}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        config=get_config_values("ood", "h0", "random_draws", "bootstrap", "seed"),
        n_layers=lambda wildcards: get_n_layers(wildcards.run),
        storage=config["cache"]["storage"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/ood.py"


rule ood_table:
    input:
        lens_eval=rules.eval_lens.output.table,
        h0=rules.h0_merge.output.table,
        ood_lens=get_expanded(rules.ood.output.lens_eval, corpus=get_eval_corpora),
        ood_ablation=get_expanded(rules.ood.output.ablation, corpus=get_eval_corpora),
    output:
        markdown=report(
            f"{RESULTS}/tables/ood_{{run}}.md",
            caption="../report/ood_table.rst",
            category="Out of distribution",
            subcategory="{run}",
            labels={"run": "{run}", "table": "out of distribution"},
        ),
        figure=report(
            f"{RESULTS}/figures/ood_{{run}}.png",
            caption="../report/ood_figure.rst",
            category="Out of distribution",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "lens KL and H0 out of distribution"},
        ),
    log:
        f"{RESULTS}/logs/ood_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        corpora=lambda wildcards: get_eval_corpora(wildcards.run),
        train_corpus=lambda wildcards: get_run(wildcards.run)["corpus"],
    script:
        "../scripts/ood_table.py"


register_experiment(
    "ood",
    section="lensspace.report.ood",
    files={
        "lens_eval": rules.ood.output.lens_eval,
        "ablation": rules.ood.output.ablation,
        "sample": rules.ood_tokenize.output.sample,
        "table": rules.ood_table.output.markdown,
        "figure": rules.ood_table.output.figure,
    },
    items={"corpus": get_eval_corpora},
    applies=get_eval_corpora,
)
