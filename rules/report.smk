# The report: one self-contained HTML page of every registered experiment of every run.
# Included last: it shows what the rule files before it registered.


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
        experiments=lambda wildcards: get_report_experiments(),
    script:
        "../scripts/report.py"
