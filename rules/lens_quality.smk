# Lens quality against the H0 verdict: lenses retrained at several budgets, each evaluated on the
# held-out tokens and running the seed-layout H0 cells; then a table and a figure.


rule lens_quality:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        bases=rules.svd.output.bases,
    output:
        sweep=f"{RESULTS}/{{run}}/lens_quality/sweep.tsv",
        sequences=f"{RESULTS}/{{run}}/lens_quality/per_sequence.tsv",
    log:
        f"{RESULTS}/logs/lens_quality/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/lens_quality/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        config=get_config_values("lens_quality", "h0", "random_draws", "bootstrap", "seed"),
        training=get_lens_training,
        lens_source=get_lens_source,
        n_layers=lambda wildcards: get_n_layers(wildcards.run),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/lens_quality.py"


rule lens_quality_table:
    input:
        sweep=rules.lens_quality.output.sweep,
    output:
        markdown=report(
            f"{RESULTS}/tables/lens_quality_{{run}}.md",
            caption="../report/lens_quality_table.rst",
            category="Lens quality",
            subcategory="{run}",
            labels={"run": "{run}", "table": "lens budget sweep"},
        ),
    log:
        f"{RESULTS}/logs/lens_quality_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/lens_quality_table.py"


rule lens_quality_figure:
    input:
        sweep=rules.lens_quality.output.sweep,
    output:
        figure=report(
            f"{RESULTS}/figures/lens_quality_{{run}}.png",
            caption="../report/lens_quality_figure.rst",
            category="Lens quality",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "H0 verdict against lens KL"},
        ),
    log:
        f"{RESULTS}/logs/lens_quality_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/lens_quality_figure.py"


register_experiment(
    "lens_quality",
    section="lensspace.report.lens_quality",
    files={
        "sweep": rules.lens_quality.output.sweep,
        "table": rules.lens_quality_table.output.markdown,
        "figure": rules.lens_quality_figure.output.figure,
    },
)
