# H1: the subspaces in the model's own residual stream, one job per `layers_per_job` layers
# (resumed from the activation cache), then merge, tabulate, plot; and the circuit ends of every head.

from lensspace.settings import circuit_params


rule h1_layer:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
        checked=ancient(rules.check_run.output.checked),
    output:
        table=f"{RESULTS}/{{run}}/h1/layers/{{layer}}.tsv",
        sequences=f"{RESULTS}/{{run}}/h1/sequences/{{layer}}.tsv",
    log:
        f"{RESULTS}/logs/h1_layer/{{run}}/{{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/h1_layer/{{run}}/{{layer}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        grid=get_ablation_grid("h1"),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/h1_layer.py"


rule h1_merge:
    input:
        table=get_expanded(rules.h1_layer.output.table, layer=get_layer_jobs("h1")),
        sequences=get_expanded(rules.h1_layer.output.sequences, layer=get_layer_jobs("h1")),
    output:
        table=f"{RESULTS}/{{run}}/h1/ablation.tsv",
        sequences=f"{RESULTS}/{{run}}/h1/per_sequence.tsv",
    log:
        f"{RESULTS}/logs/h1_merge/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/merge_tables.py"


rule h1_table:
    input:
        table=rules.h1_merge.output.table,
        model=get_model_manifest,
        reference=REFERENCE,
    output:
        markdown=report(
            f"{RESULTS}/tables/h1_{{run}}.md",
            caption="../report/h1_table.rst",
            category="H1",
            subcategory="{run}",
            labels={"run": "{run}", "table": "H1 (original layout)"},
        ),
    log:
        f"{RESULTS}/logs/h1_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        title="H1",
        description=(
            "KL(model || ablated model) of the final output in nats; the subspace is removed "
            "from the residual stream at the layer and the rest of the model runs"
        ),
        site="residual",
        reference_table=lambda wildcards: get_reference_table(wildcards.run, "h1"),
    script:
        "../scripts/ablation_table.py"


rule h1_figure:
    input:
        table=rules.h1_merge.output.table,
    output:
        figure=report(
            f"{RESULTS}/figures/h1_{{run}}.png",
            caption="../report/h1_figure.rst",
            category="H1",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "H1 ablation grid"},
        ),
    log:
        f"{RESULTS}/logs/h1_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        title="H1",
        description="KL(model || ablated model), residual stream",
    script:
        "../scripts/ablation_figure.py"


rule h1_heads:
    input:
        tokens=rules.tokenize.output.tokens,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
        checked=ancient(rules.check_run.output.checked),
    output:
        heads=f"{RESULTS}/{{run}}/h1/heads.tsv",
        mlp=f"{RESULTS}/{{run}}/h1/mlp.tsv",
        test=f"{RESULTS}/{{run}}/h1/heads_test.tsv",
    log:
        f"{RESULTS}/logs/h1_heads/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/h1_heads/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        settings=circuit_params(config),
        n_boot=config["bootstrap"]["n_resamples"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/h1_heads.py"


rule h1_heads_figure:
    input:
        heads=rules.h1_heads.output.heads,
        test=rules.h1_heads.output.test,
    output:
        figure=report(
            f"{RESULTS}/figures/h1_heads_{{run}}.png",
            caption="../report/h1_heads.rst",
            category="H1",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "circuit ends"},
        ),
    log:
        f"{RESULTS}/logs/h1_heads_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/h1_heads_figure.py"


register_experiment(
    "h1",
    section="lensspace.report.h1",
    files={
        "ablation": rules.h1_merge.output.table,
        "per_sequence": rules.h1_merge.output.sequences,
        "heads": rules.h1_heads.output.heads,
        "heads_test": rules.h1_heads.output.test,
        "mlp": rules.h1_heads.output.mlp,
        "heads_figure": rules.h1_heads_figure.output.figure,
        "table": rules.h1_table.output.markdown,
        "figure": rules.h1_figure.output.figure,
        **get_robustness_files("h1"),
    },
)
