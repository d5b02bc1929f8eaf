# Circuit ends down to single MLP neurons: the geometry of every neuron, the entropy-neuron
# candidates and their causal test (mean ablation beside random neurons of matched norm).

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
        candidates=f"{RESULTS}/{{run}}/neurons/candidates.tsv",
        joint=f"{RESULTS}/{{run}}/neurons/joint.tsv",
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
        config=get_config_values("neurons", "random_draws", "bootstrap", "seed"),
        reference=lambda wildcards: get_reference_table(wildcards.run, "neurons"),
        device=config["device"],
        compute=get_compute(),
    script:
        "../scripts/neurons.py"


rule neurons_table:
    input:
        candidates=rules.neurons.output.candidates,
        reference=rules.neurons.output.reference,
    output:
        markdown=report(
            f"{RESULTS}/tables/neurons_{{run}}.md",
            caption="../report/neurons_table.rst",
            category="Neurons",
            subcategory="{run}",
            labels={"run": "{run}", "table": "entropy-neuron candidates"},
        ),
    log:
        f"{RESULTS}/logs/neurons_table/{{run}}.log",
    conda:
        "../envs/lensspace.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
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
            labels={"run": "{run}", "figure": "neuron share against norm"},
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
        "candidates": rules.neurons.output.candidates,
        "joint": rules.neurons.output.joint,
        "reference": rules.neurons.output.reference,
        "table": rules.neurons_table.output.markdown,
        "figure": rules.neurons_figure.output.figure,
    },
)
