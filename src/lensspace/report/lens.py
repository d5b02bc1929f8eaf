"""Lens quality: the tuned lens against the logit lens, held-out KL per layer."""

from __future__ import annotations

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure


def quality_table(lens_eval: pd.DataFrame) -> pd.DataFrame:
    """``layer | tuned KL | tuned 95% CI | logit KL | logit 95% CI`` from ``lens_eval.tsv``."""
    out = pd.DataFrame({"layer": sorted(lens_eval["layer"].unique())})
    for lens in dict.fromkeys(lens_eval["lens"]):
        part = lens_eval[lens_eval["lens"] == lens].set_index("layer").reindex(out["layer"])
        out[f"{lens} KL"] = part["kl"].to_numpy()
        out[f"{lens} 95% CI"] = [
            f"[{words.number(lo)}, {words.number(hi)}]"
            for lo, hi in zip(part["kl_lo"], part["kl_hi"])
        ]
    return out


def comparison(lens_eval: pd.DataFrame) -> str | None:
    """Where the tuned lens beats the logit lens, and their KLs at the last layer."""
    wide = lens_eval.pivot(index="layer", columns="lens", values="kl")
    if not {"tuned", "logit"} <= set(wide.columns):
        return None
    better = int((wide["tuned"] < wide["logit"]).sum())
    return (
        f"The tuned lens has a lower held-out KL than the logit lens at {better} of {len(wide)} "
        f"layers; at the last layer ({wide.index[-1]}) tuned {words.number(wide['tuned'].iloc[-1])}"
        f" vs logit {words.number(wide['logit'].iloc[-1])} nats."
    )


def section(run: str, files: dict, context: Context) -> Section | None:
    path = existing(files.get("lens_eval"))
    if path is None:
        return None
    frame = pd.read_csv(path, sep="\t")
    said = comparison(frame)
    blocks: list = [Text(said)] if said else []
    lens = context.spec(run)["lens"]
    origin = (
        f"pretrained ({lens.get('id', '')})"
        if lens.get("source") == "pretrained"
        else "trained here (least squares, then KL refinement)"
    )
    caption = (
        f"Lens quality of {run}: held-out KL(p_final ‖ p_lens) per layer for the tuned lens "
        f"({origin}) and the logit lens (the unembedding applied to h_i directly); "
        f"nats, mean over {words.tokens(frame)} held-out token positions; band: "
        f"{words.interval(context.n_resamples)}."
    )
    blocks += figure(files.get("figure"), caption)
    blocks.append(
        Table(
            quality_table(frame),
            "The same, as numbers: KL per layer and lens, with the 95% bootstrap interval.",
        )
    )
    return Section("lens-quality", "Lens quality", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    path = existing(files.get("lens_eval"))
    said = comparison(pd.read_csv(path, sep="\t")) if path is not None else None
    return Finding("Lens quality", said) if said else None
