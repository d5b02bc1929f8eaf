# Circuit search cut down by circuit ends and beginnings: per task, EAP-IG over every edge of the
# model's graph, then one job per fraction of nodes kept (by the study's labels, by a per-task
# attribution pass, at random); the summary compares their faithfulness curves and compute.


rule circuit_labels:
    input:
        model=get_model_manifest,
        heads=rules.h1_heads.output.heads,
        mlp=rules.h1_heads.output.mlp,
    output:
        labels=f"{RESULTS}/{{run}}/circuits/labels.tsv",
    log:
        f"{RESULTS}/logs/circuit_labels/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=4000,
        runtime=10,
    script:
        "../scripts/circuit_labels.py"


rule circuit_task:
    input:
        model=get_model_manifest,
    output:
        prompts=f"{RESULTS}/{{run}}/circuits/{{task}}/prompts.tsv",
    log:
        f"{RESULTS}/logs/circuit_task/{{run}}/{{task}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        settings=get_circuit_settings("n_prompts", "induction_half_len"),
        seed=config["seed"],
    script:
        "../scripts/circuit_task.py"


rule circuit_full:
    input:
        model=get_model_manifest,
        prompts=rules.circuit_task.output.prompts,
    output:
        metrics=f"{RESULTS}/{{run}}/circuits/{{task}}/full/metrics.tsv",
        costs=f"{RESULTS}/{{run}}/circuits/{{task}}/full/costs.tsv",
        edges=f"{RESULTS}/{{run}}/circuits/{{task}}/full/edges.safetensors",
        circuit=f"{RESULTS}/{{run}}/circuits/{{task}}/full/circuit.tsv",
        anchors=f"{RESULTS}/{{run}}/circuits/{{task}}/full/anchors.tsv",
    log:
        f"{RESULTS}/logs/circuit_full/{{run}}/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/circuit_full/{{run}}/{{task}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_circuit_settings("n_prompts", "induction_half_len", "ig_steps", "budgets"),
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/circuit_full.py"


rule circuit_fraction:
    input:
        model=get_model_manifest,
        prompts=rules.circuit_task.output.prompts,
        labels=rules.circuit_labels.output.labels,
        edges=rules.circuit_full.output.edges,
        costs=rules.circuit_full.output.costs,
    output:
        metrics=f"{RESULTS}/{{run}}/circuits/{{task}}/fraction-{{fraction}}/metrics.tsv",
        costs=f"{RESULTS}/{{run}}/circuits/{{task}}/fraction-{{fraction}}/costs.tsv",
        recall=f"{RESULTS}/{{run}}/circuits/{{task}}/fraction-{{fraction}}/recall.tsv",
    log:
        f"{RESULTS}/logs/circuit_fraction/{{run}}/{{task}}/{{fraction}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/circuit_fraction/{{run}}/{{task}}/{{fraction}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=get_circuit_settings(
            "n_prompts", "induction_half_len", "ig_steps", "budgets", "random_draws"
        ),
        seed=config["seed"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/circuit_fraction.py"


rule circuit_summary:
    input:
        anchors=rules.circuit_full.output.anchors,
        full_metrics=rules.circuit_full.output.metrics,
        full_costs=rules.circuit_full.output.costs,
        metrics=get_circuit_fraction_files(rules.circuit_fraction.output.metrics),
        costs=get_circuit_fraction_files(rules.circuit_fraction.output.costs),
        recall=get_circuit_fraction_files(rules.circuit_fraction.output.recall),
    output:
        faithfulness=f"{RESULTS}/{{run}}/circuits/{{task}}/faithfulness.tsv",
        summary=f"{RESULTS}/{{run}}/circuits/{{task}}/summary.tsv",
    log:
        f"{RESULTS}/logs/circuit_summary/{{run}}/{{task}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        n_boot=config["bootstrap"]["n_resamples"],
        seed=config["seed"],
    script:
        "../scripts/circuit_summary.py"


rule circuit_search_table:
    input:
        prompts=get_expanded(rules.circuit_task.output.prompts, task=get_circuit_tasks),
        faithfulness=get_expanded(rules.circuit_summary.output.faithfulness, task=get_circuit_tasks),
        summary=get_expanded(rules.circuit_summary.output.summary, task=get_circuit_tasks),
    output:
        markdown=report(
            f"{RESULTS}/tables/circuit_search_{{run}}.md",
            caption="../report/circuit_search_table.rst",
            category="Circuit search",
            subcategory="{run}",
            labels={"run": "{run}", "table": "circuit search"},
        ),
        figure=report(
            f"{RESULTS}/figures/circuit_search_{{run}}.png",
            caption="../report/circuit_search_figure.rst",
            category="Circuit search",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "circuit search"},
        ),
    log:
        f"{RESULTS}/logs/circuit_search_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        tasks=get_job_circuit_tasks,
    script:
        "../scripts/circuit_search_table.py"


register_experiment(
    "circuit_search",
    section="lensspace.report.circuit_search",
    files={
        "prompts": rules.circuit_task.output.prompts,
        "faithfulness": rules.circuit_summary.output.faithfulness,
        "summary": rules.circuit_summary.output.summary,
        "table": rules.circuit_search_table.output.markdown,
        "figure": rules.circuit_search_table.output.figure,
    },
    items={"task": get_circuit_tasks},
    applies=get_circuit_tasks,
)
