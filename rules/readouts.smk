# Any readout in place of the unembedding: each run's declared readouts (a masked unembedding,
# a probe, the back half of the model), their labels, fidelity and H0 cells; one table and
# figure per run.


rule readouts_residuals:
    input:
        model=get_model_manifest,
        tokens=get_expanded(rules.ood_tokenize.output.tokens, corpus=get_eval_corpora),
    output:
        residuals=f"{RESULTS}/{{run}}/readouts/eval_corpora.safetensors",
    log:
        f"{RESULTS}/logs/readouts_residuals/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/readouts_residuals/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        layers=lambda wildcards: get_readout_residual_layers(wildcards.run),
        corpora=lambda wildcards: get_eval_corpora(wildcards.run),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/readouts_residuals.py"


rule readout:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
        residuals=rules.readouts_residuals.output.residuals,
    output:
        fidelity=f"{RESULTS}/{{run}}/readouts/{{readout}}/fidelity.tsv",
        ablation=f"{RESULTS}/{{run}}/readouts/{{readout}}/ablation.tsv",
        verdicts=f"{RESULTS}/{{run}}/readouts/{{readout}}/verdicts.tsv",
        summary=f"{RESULTS}/{{run}}/readouts/{{readout}}/summary.tsv",
    log:
        f"{RESULTS}/logs/readout/{{run}}/{{readout}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/readout/{{run}}/{{readout}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        readout=get_readout_settings,
        config=get_config_values("random_draws", "bootstrap", "seed"),
        corpus=lambda wildcards: get_run(wildcards.run)["corpus"],
        corpora=lambda wildcards: get_eval_corpora(wildcards.run),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/readout.py"


rule readouts_table:
    input:
        summary=get_expanded(rules.readout.output.summary, readout=get_run_readouts),
        fidelity=get_expanded(rules.readout.output.fidelity, readout=get_run_readouts),
        ablation=get_expanded(rules.readout.output.ablation, readout=get_run_readouts),
        verdicts=get_expanded(rules.readout.output.verdicts, readout=get_run_readouts),
    output:
        markdown=report(
            f"{RESULTS}/tables/readouts_{{run}}.md",
            caption="../report/readouts_table.rst",
            category="Readouts",
            subcategory="{run}",
            labels={"run": "{run}", "table": "readouts"},
        ),
        figure=report(
            f"{RESULTS}/figures/readouts_{{run}}.png",
            caption="../report/readouts_figure.rst",
            category="Readouts",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "readouts"},
        ),
    log:
        f"{RESULTS}/logs/readouts_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/readouts_table.py"


register_experiment(
    "readouts",
    section="lensspace.report.readouts",
    files={
        "summary": rules.readout.output.summary,
        "fidelity": rules.readout.output.fidelity,
        "ablation": rules.readout.output.ablation,
        "verdicts": rules.readout.output.verdicts,
        "table": rules.readouts_table.output.markdown,
        "figure": rules.readouts_table.output.figure,
    },
    items={"readout": get_run_readouts},
    applies=get_run_readouts,
)
