# Nodes, not only layers: every attention head and MLP of the chosen blocks mean-ablated and run
# through every later block; its total effect predicted by direct attribution, the layer's lens,
# a first-order estimate and the node's own lens. Layer jobs, then the scores across nodes.


rule nodes_layer:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
    output:
        sums=f"{RESULTS}/{{run}}/nodes/layers/{{layer}}/sums.tsv",
        fits=f"{RESULTS}/{{run}}/nodes/layers/{{layer}}/fits.tsv",
    log:
        f"{RESULTS}/logs/nodes_layer/{{run}}/{{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/nodes_layer/{{run}}/{{layer}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_node_settings(),
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/nodes_layer.py"


rule nodes:
    input:
        sums=get_expanded(rules.nodes_layer.output.sums, layer=get_node_jobs),
        fits=get_expanded(rules.nodes_layer.output.fits, layer=get_node_jobs),
        heads=rules.h1_heads.output.heads,
    output:
        scores=f"{RESULTS}/{{run}}/nodes/scores.tsv",
        comparisons=f"{RESULTS}/{{run}}/nodes/comparisons.tsv",
        ranks=f"{RESULTS}/{{run}}/nodes/ranks.tsv",
        induction=f"{RESULTS}/{{run}}/nodes/induction.tsv",
        fits=f"{RESULTS}/{{run}}/nodes/fits.tsv",
    log:
        f"{RESULTS}/logs/nodes/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        n_boot=config["bootstrap"]["n_resamples"],
        seed=config["seed"],
        margin=config["nodes"]["min_r2_gain"],
        n_permutations=config["h1"]["heads"]["n_permutations"],
    script:
        "../scripts/nodes.py"


rule nodes_table:
    input:
        scores=rules.nodes.output.scores,
        comparisons=rules.nodes.output.comparisons,
        ranks=rules.nodes.output.ranks,
        induction=rules.nodes.output.induction,
    output:
        markdown=report(
            f"{RESULTS}/tables/nodes_{{run}}.md",
            caption="../report/nodes_table.rst",
            category="Nodes",
            subcategory="{run}",
            labels={"run": "{run}", "table": "per-node lenses"},
        ),
        figure=report(
            f"{RESULTS}/figures/nodes_{{run}}.png",
            caption="../report/nodes_figure.rst",
            category="Nodes",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "per-node lenses"},
        ),
    log:
        f"{RESULTS}/logs/nodes_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/nodes_table.py"


register_experiment(
    "nodes",
    section="lensspace.report.nodes",
    files={
        "scores": rules.nodes.output.scores,
        "comparisons": rules.nodes.output.comparisons,
        "ranks": rules.nodes.output.ranks,
        "induction": rules.nodes.output.induction,
        "fits": rules.nodes.output.fits,
        "table": rules.nodes_table.output.markdown,
        "figure": rules.nodes_table.output.figure,
    },
)
