"""Markdown table of the entropy-neuron candidates and their causal test."""
import pandas as pd

from lensspace import runtime, tables


def body(sm):
    candidates = pd.read_csv(sm.input.candidates, sep="\t")
    text = (f"# Entropy-neuron candidates, {sm.wildcards.run}\n\n"
            "Mean ablation of each candidate alone; 95% bootstrap intervals over held-out sequences; "
            "`random`: random neurons of the same layer and matched norm (mean over draws); "
            "`diff`: paired difference candidate − random.\n\n")
    runtime.write_text(text + tables.markdown(tables.neuron_candidates_table(candidates), digits=4) + "\n",
                       sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
