# The report: robustness grids per ablation experiment, and one self-contained HTML page.


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


rule html_report:
    input:
        shown=get_report_inputs,
        reference=REFERENCE,
    output:
        html=report(
            f"{RESULTS}/report/index.html",
            caption="../report/index.rst",
            category="Report",
            labels={"page": "index.html"},
        ),
    log:
        f"{RESULTS}/logs/html_report.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        # the page shows the whole config (provenance), so any edit rebuilds it
        config=config,
    script:
        "../scripts/report.py"
