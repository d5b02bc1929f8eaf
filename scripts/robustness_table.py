"""Paired comparisons behind every conclusion of an ablation experiment (comparisons.tsv), and
the robustness grid as Markdown: does each conclusion hold per layer under every variant?"""

import pandas as pd

from lensspace import runtime
from lensspace.robustness import compare, markdown_grid


def body(sm):
    ablation = pd.read_csv(sm.input.table, sep="\t")
    verdicts = compare(
        pd.read_csv(sm.input.sequences, sep="\t"), n_boot=sm.params.n_boot, seed=sm.params.seed
    )
    runtime.write_tsv(verdicts, sm.output.comparisons)
    header = (
        f"# Robustness — {sm.wildcards.experiment}, {sm.wildcards.run}\n\n"
        'Per conclusion "A > B" (ablating A raises the KL more than ablating B), variant '
        f"and layer; {int(ablation['n_tokens'].max())} held-out tokens in "
        f"{int(verdicts['n_sequences'].max()) if len(verdicts) else 0} sequences.\n\n"
    )
    runtime.write_text(header + markdown_grid(verdicts), sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
