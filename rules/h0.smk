# H0: ablate SVD subspaces in lens space, one job per `layers_per_job` layers, then merge, tabulate, plot.


rule h0_layer:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
        checked=ancient(rules.check_run.output.checked),
    output:
        table=f"{RESULTS}/{{run}}/h0/layers/{{layer}}.tsv",
        sequences=f"{RESULTS}/{{run}}/h0/sequences/{{layer}}.tsv",
        shares=f"{RESULTS}/{{run}}/h0/share_layers/{{layer}}.tsv",
    log:
        f"{RESULTS}/logs/h0_layer/{{run}}/{{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/h0_layer/{{run}}/{{layer}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        grid=get_ablation_grid("h0"),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/h0_layer.py"


rule h0_merge:
    input:
        table=get_expanded(rules.h0_layer.output.table, layer=get_layer_jobs("h0")),
        sequences=get_expanded(rules.h0_layer.output.sequences, layer=get_layer_jobs("h0")),
        shares=get_expanded(rules.h0_layer.output.shares, layer=get_layer_jobs("h0")),
    output:
        table=f"{RESULTS}/{{run}}/h0/ablation.tsv",
        sequences=f"{RESULTS}/{{run}}/h0/per_sequence.tsv",
        shares=f"{RESULTS}/{{run}}/h0/shares.tsv",
    log:
        f"{RESULTS}/logs/h0_merge/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/merge_tables.py"


rule h0_table:
    input:
        table=rules.h0_merge.output.table,
        model=get_model_manifest,
        reference=REFERENCE,
    output:
        markdown=report(
            f"{RESULTS}/tables/h0_{{run}}.md",
            caption="../report/h0_table.rst",
            category="H0",
            subcategory="{run}",
            labels={"run": "{run}", "table": "H0 (original layout)"},
        ),
    log:
        f"{RESULTS}/logs/h0_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        title="H0",
        description="KL(lens || ablated lens) in nats; lens space, ablated before the final norm",
        site="pre_norm",
        reference_table=lambda wildcards: get_reference_table(wildcards.run, "h0"),
    script:
        "../scripts/ablation_table.py"


rule h0_figure:
    input:
        table=rules.h0_merge.output.table,
    output:
        figure=report(
            f"{RESULTS}/figures/h0_{{run}}.png",
            caption="../report/h0_figure.rst",
            category="H0",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "H0 ablation grid"},
        ),
    log:
        f"{RESULTS}/logs/h0_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        title="H0",
        description="KL(lens || ablated lens) in lens space",
    script:
        "../scripts/ablation_figure.py"


register_experiment(
    "h0",
    section="lensspace.report.h0",
    files={
        "ablation": rules.h0_merge.output.table,
        "per_sequence": rules.h0_merge.output.sequences,
        "shares": rules.h0_merge.output.shares,
        "table": rules.h0_table.output.markdown,
        "figure": rules.h0_figure.output.figure,
        **get_robustness_files("h0"),
    },
)
