# Circuit ends down to single MLP neurons: the geometry of every neuron, and the entropy-neuron
# test of the last block (total against direct effect, each neuron against its matched ones).

ENTROPY_NEURONS = str(Path(workflow.basedir) / "reference" / "entropy_neurons.tsv")


rule neurons:
    input:
        tokens=rules.tokenize.output.tokens,
        cache=rules.cache_activations.output.cache,
        model=get_model_manifest,
        lens=f"{RESULTS}/{{run}}/lens/params.pt",
        bases=rules.svd.output.bases,
        reference=ENTROPY_NEURONS,
    output:
        neurons=f"{RESULTS}/{{run}}/neurons/neurons.tsv",
        measured=f"{RESULTS}/{{run}}/neurons/measured.tsv",
        reference=f"{RESULTS}/{{run}}/neurons/reference.tsv",
    log:
        f"{RESULTS}/logs/neurons/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/neurons/{{run}}.tsv"
    conda:
        "../envs/lensspace.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        config=get_config_values("neurons", "bootstrap", "seed"),
        reference=lambda wildcards: get_reference_table(wildcards.run, "neurons"),
        model=lambda wildcards: get_run(wildcards.run)["model"],
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/neurons.py"


rule neurons_table:
    input:
        measured=rules.neurons.output.measured,
        reference=rules.neurons.output.reference,
    output:
        markdown=report(
            f"{RESULTS}/tables/neurons_{{run}}.md",
            caption="../report/neurons_table.rst",
            category="Neurons",
            subcategory="{run}",
            labels={"run": "{run}", "table": "entropy neurons"},
        ),
    log:
        f"{RESULTS}/logs/neurons_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=get_config_values("neurons"),
    script:
        "../scripts/neurons_table.py"


rule neurons_figure:
    input:
        neurons=rules.neurons.output.neurons,
        reference=rules.neurons.output.reference,
    output:
        figure=report(
            f"{RESULTS}/figures/neurons_{{run}}.png",
            caption="../report/neurons_figure.rst",
            category="Neurons",
            subcategory="{run}",
            labels={"run": "{run}", "figure": "entropy neurons"},
        ),
    log:
        f"{RESULTS}/logs/neurons_figure/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/neurons_figure.py"


register_experiment(
    "neurons",
    section="lensspace.report.neurons",
    files={
        "neurons": rules.neurons.output.neurons,
        "measured": rules.neurons.output.measured,
        "reference": rules.neurons.output.reference,
        "table": rules.neurons_table.output.markdown,
        "figure": rules.neurons_figure.output.figure,
    },
)
