"""The robustness grid of an ablation experiment, as Markdown: does each conclusion hold per
layer under every variant and against the random control?"""
import pandas as pd

from lensspace import runtime
from lensspace.robustness import classify, markdown_grid


def body(sm):
    ablation = pd.read_csv(sm.input.table, sep="\t")
    header = (f"# Robustness — {sm.wildcards.experiment}, {sm.wildcards.run}\n\n"
              "Per conclusion \"A > B\" (ablating A raises the KL more than ablating B), variant "
              f"and layer; {int(ablation['n_tokens'].max())} held-out tokens, 95% bootstrap "
              "intervals over sequences.\n\n")
    runtime.write_text(header + markdown_grid(classify(ablation)), sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
