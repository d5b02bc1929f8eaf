# H2: embedding lenses (circuit beginnings), one job per `layers_per_job` layers, then merge, tabulate, plot.

from lensspace.settings import embedding_lens_params


rule h2_layer:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        checked=ancient(rules.check_run.output.checked),
    output:
        table=f"{RESULTS}/{{run}}/h2/layers/{{layer}}.tsv",
        fit=f"{RESULTS}/{{run}}/h2/fit_layers/{{layer}}.tsv",
        sequences=f"{RESULTS}/{{run}}/h2/sequences/{{layer}}.tsv",
    log:
        f"{RESULTS}/logs/h2_layer/{{run}}/{{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/h2_layer/{{run}}/{{layer}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        settings=embedding_lens_params(config),
        grid=get_ablation_grid("h2"),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/h2_layer.py"


rule h2_merge:
    input:
        table=get_expanded(rules.h2_layer.output.table, layer=get_layer_jobs("h2")),
        fit=get_expanded(rules.h2_layer.output.fit, layer=get_layer_jobs("h2")),
        sequences=get_expanded(rules.h2_layer.output.sequences, layer=get_layer_jobs("h2")),
    output:
        table=f"{RESULTS}/{{run}}/h2/ablation.tsv",
        fit=f"{RESULTS}/{{run}}/h2/fit.tsv",
        sequences=f"{RESULTS}/{{run}}/h2/per_sequence.tsv",
    log:
        f"{RESULTS}/logs/h2_merge/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/merge_tables.py"


rule h2_table:
    input:
        table=rules.h2_merge.output.table,
        fit=rules.h2_merge.output.fit,
    output:
        markdown=report(
            f"{RESULTS}/tables/h2_{{run}}.md",
            caption="../report/h2_table.rst",
            category="H2",
            subcategory="{run}",
            labels={"run": "{run}", "table": "embedding lenses"},
        ),
    log:
        f"{RESULTS}/logs/h2_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/h2_table.py"


rule h2_figure:
    input:
        table=rules.h2_merge.output.table,
        fit=rules.h2_merge.output.fit,
    output:
        figure=report(
            f"{RESULTS}/figures/h2_{{run}}.png",
            caption="../report/h2_figure.rst",
            category="H2",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "embedding lenses"},
        ),
    log:
        f"{RESULTS}/logs/h2_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/h2_figure.py"


register_experiment(
    "h2",
    section="lensspace.report.h2",
    files={
        "ablation": rules.h2_merge.output.table,
        "per_sequence": rules.h2_merge.output.sequences,
        "fit": rules.h2_merge.output.fit,
        "table": rules.h2_table.output.markdown,
        "figure": rules.h2_figure.output.figure,
        **get_robustness_files("h2"),
    },
)
