# Layer-shuffle invariance: batches of swap pairs as parallel jobs, window permutations,
# then one table of swaps and the heatmaps. A second least-squares lens at a larger ridge
# (shuffle.second_ridge) gives the lens_ridge space.

from lensspace.settings import ridge_lens_params, second_ridge, shuffle_pair_chunks, shuffle_params


rule ridge_lens:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
    output:
        config=f"{RESULTS}/{{run}}/shuffle/ridge_lens/config.json",
        params=f"{RESULTS}/{{run}}/shuffle/ridge_lens/params.pt",
    log:
        f"{RESULTS}/logs/ridge_lens/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ridge_lens/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        training=ridge_lens_params(config["shuffle"], config["seed"]),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/train_lens.py"


# The lens_ridge space's second lens, where that space is on (shuffle.second_ridge).
SECOND_RIDGE_LENS = (
    rules.ridge_lens.output.params if second_ridge(config["shuffle"]) is not None else []
)


rule shuffle_pairs:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        ridge_lens=SECOND_RIDGE_LENS,
    output:
        table=f"{RESULTS}/{{run}}/shuffle/pairs/{{chunk}}.tsv",
    log:
        f"{RESULTS}/logs/shuffle_pairs/{{run}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/shuffle_pairs/{{run}}/{{chunk}}.tsv"
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        pairs=lambda wildcards: get_shuffle_chunks(wildcards.run)[int(wildcards.chunk)],
        shuffle=shuffle_params(config, windows=False),
        lens_ridge=get_lens_ridge,
        second_ridge=second_ridge(config["shuffle"]),
        n_boot=config["bootstrap"]["n_resamples"],
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/shuffle.py"


rule shuffle_windows:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        ridge_lens=SECOND_RIDGE_LENS,
    output:
        table=f"{RESULTS}/{{run}}/shuffle/windows.tsv",
        conditions=f"{RESULTS}/{{run}}/shuffle/conditions.tsv",
    log:
        f"{RESULTS}/logs/shuffle_windows/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/shuffle_windows/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        pairs=[],
        shuffle=shuffle_params(config, windows=True),
        lens_ridge=get_lens_ridge,
        second_ridge=second_ridge(config["shuffle"]),
        n_boot=config["bootstrap"]["n_resamples"],
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/shuffle.py"


rule shuffle_merge:
    input:
        table=get_expanded(
            rules.shuffle_pairs.output.table,
            rules.shuffle_windows.output.table,
            chunk=lambda run: range(len(get_shuffle_chunks(run))),
        ),
    output:
        table=f"{RESULTS}/{{run}}/shuffle/swaps.tsv",
    log:
        f"{RESULTS}/logs/shuffle_merge/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/merge_tables.py"


rule shuffle_figure:
    input:
        table=rules.shuffle_merge.output.table,
        model=get_model_manifest,
    output:
        figure=report(
            f"{RESULTS}/figures/shuffle_{{run}}.png",
            caption="../report/shuffle_figure.rst",
            category="Layer shuffle",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "swap costs"},
        ),
    log:
        f"{RESULTS}/logs/shuffle_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/shuffle_figure.py"


register_experiment(
    "shuffle",
    section="lensspace.report.shuffle",
    files={
        "swaps": rules.shuffle_merge.output.table,
        "windows": rules.shuffle_windows.output.table,
        "conditions": rules.shuffle_windows.output.conditions,
        "figure": rules.shuffle_figure.output.figure,
    },
)
