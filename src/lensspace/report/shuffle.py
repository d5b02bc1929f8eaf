"""Layer shuffle: the cost of swapping two blocks, natively and in lens space."""

from __future__ import annotations

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table
from lensspace.report.sections import Context, existing, figure


def split(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The swaps of two blocks, and the permutations within windows (``kind``)."""
    kinds = table["kind"] if "kind" in table else pd.Series("swap", index=table.index)
    return table[kinds == "swap"], table[kinds != "swap"]


def section(run: str, files: dict, context: Context) -> Section | None:
    path = existing(files.get("swaps"))
    if path is None:
        return None
    swaps, windows = split(pd.read_csv(path, sep="\t"))
    section = Section("shuffle", "Layer shuffle")
    caption = (
        f"Layer shuffle, {run}: blocks i and j swapped; KL(p_model ‖ p_swapped) of the "
        f"final output, nats, mean over {words.tokens(swaps)} held-out tokens; "
        f"{words.interval(context.n_resamples)}."
    )
    section.blocks += figure(files.get("figure"), caption)
    for space, part in swaps.groupby("space", sort=False):
        matrix = part.pivot_table(
            index="i", columns="j", values="kl", aggfunc="first"
        ).reset_index()
        matrix.columns = ["i \\ j", *(str(c) for c in matrix.columns[1:])]
        section.blocks.append(
            Table(matrix, f"Swap cost (KL, nats) in the {space} space; " + caption)
        )
    if not windows.empty:
        section.blocks.append(
            Table(
                windows.reset_index(drop=True),
                (
                    "Permutations within windows of neighbouring blocks: KL(p_model ‖ "
                    f"p_permuted) in nats with 95% intervals and top-1 agreement, "
                    f"{words.tokens(windows)} held-out tokens."
                ),
                collapsed=True,
            )
        )
    conditions = existing(files.get("conditions"))
    if conditions is not None:
        section.blocks.append(
            Table(
                pd.read_csv(conditions, sep="\t"),
                (
                    "Condition numbers of the translators I + A_i (how far lens space distorts "
                    "each layer)."
                ),
                collapsed=True,
            )
        )
    return section


def extremes(swaps: pd.DataFrame) -> str | None:
    """Which swap costs most and which least, in the native space (else the first measured)."""
    if swaps.empty:
        return None
    spaces = list(dict.fromkeys(swaps["space"]))
    space = "native" if "native" in spaces else spaces[0]
    part = swaps[swaps["space"] == space]
    most, least = part.loc[part["kl"].idxmax()], part.loc[part["kl"].idxmin()]
    return (
        f"Of the {len(part)} swaps of two blocks in the {space} space, swapping blocks "
        f"{int(most['i'])} and {int(most['j'])} costs most (KL {words.number(most['kl'])} nats), "
        f"swapping {int(least['i'])} and {int(least['j'])} least "
        f"({words.number(least['kl'])} nats)."
    )


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """The costliest and cheapest swap, then when lens-space swaps measure the translators."""
    from lensspace.experiments.shuffle import translator_dominated

    path = existing(files.get("swaps"))
    if path is None:
        return None
    table = pd.read_csv(path, sep="\t")
    sentence = extremes(split(table)[0])
    statement = translator_dominated(table)
    if sentence is None and statement is None:
        return None
    return Finding("Layer shuffle", sentence or "", [statement] if statement else [])
