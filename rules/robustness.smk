# Robustness of the ablation experiments (H0, H1, H2): paired comparisons of their cells over
# sequences, and a grid of verdicts per conclusion, variant and layer.


rule robustness_table:
    input:
        table=f"{RESULTS}/{{run}}/{{experiment}}/ablation.tsv",
        sequences=f"{RESULTS}/{{run}}/{{experiment}}/per_sequence.tsv",
    output:
        comparisons=f"{RESULTS}/{{run}}/{{experiment}}/comparisons.tsv",
        markdown=report(
            f"{RESULTS}/tables/robustness_{{experiment}}_{{run}}.md",
            caption="../report/robustness.rst",
            category="Robustness",
            subcategory="{run}",
            labels={"run": "{run}", "experiment": "{experiment}"},
        ),
    log:
        f"{RESULTS}/logs/robustness_table/{{experiment}}_{{run}}.log",
    wildcard_constraints:
        experiment=r"h\d+",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        n_boot=config["bootstrap"]["test_resamples"],
        seed=config["seed"],
    script:
        "../scripts/robustness_table.py"
