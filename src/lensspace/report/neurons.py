"""Single MLP neurons: their lens-space geometry, the entropy-neuron candidates, each
candidate's causal test against matched random neurons, and the published list."""

from __future__ import annotations

import pandas as pd

from lensspace import tables
from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure, read_tsv


def _separated(frame: pd.DataFrame, name: str) -> tuple[int, int]:
    """How many rows hold / are reversed on metric ``name`` (Holm-adjusted, beyond the matched
    draws)."""
    return int((frame[f"verdict_{name}"] == "holds").sum()), int(
        (frame[f"verdict_{name}"] == "reversed").sum()
    )


def section(run: str, files: dict, context: Context) -> Section | None:
    """Single MLP neurons: geometry, entropy-neuron candidates, their causal test, the published
    list."""
    path = existing(files.get("neurons"))
    if path is None:
        return None
    neurons = pd.read_csv(path, sep="\t")
    candidates = read_tsv(files["candidates"])
    joint = read_tsv(files["joint"])
    settings = context.config.get("neurons", {})
    threshold = settings.get("min_internal_share", 0.9)
    k = int(neurons["k"].iloc[0])
    n_layers = neurons["layer"].nunique()
    pool = neurons[neurons["in_candidate_layers"].astype(bool)]
    passing = pool[pool["internal_fraction"] >= threshold]
    blocks: list = []
    lines = [
        f"{len(neurons):,} MLP neurons ({n_layers} blocks × {len(neurons) // n_layers:,}); the "
        "lens-space share of each neuron's output weight w is ||Qᵀ M w||² / ||M w||² in the "
        f"unembed basis, k = {k} (M = I + A_(l+1) of the residual block l writes into; I after the "
        f"last block). Median internal share {neurons['internal_fraction'].median():.3f}; "
        f"{len(passing):,} of the {len(pool):,} neurons of {words.layers(pool['layer'])} reach "
        f"{threshold:g} or more."
    ]
    if candidates.empty:
        lines.append("No neuron passes the threshold: there are no candidates to ablate.")
    else:
        n = len(candidates)
        lines.append(
            f"Candidates: the {n} largest-norm of them ({words.layers(candidates['layer'])}; norms "
            f"{candidates['norm'].min():.2f}–{candidates['norm'].max():.2f} against a median of "
            f"{neurons['norm'].median():.2f})."
        )
        if "null_fraction" in neurons:
            ranks = pool.assign(
                rel=pool.groupby("layer")["logit_effect_rel"].rank(pct=True),
                null=pool.groupby("layer")["null_fraction"].rank(pct=True),
            )
            chosen = ranks.set_index(["layer", "neuron"]).loc[
                list(zip(candidates["layer"], candidates["neuron"]))
            ]
            lines.append(
                "In the geometry of Stolfo et al. (the centred, gain-folded unembedding's bottom "
                f"{int(neurons['null_k'].iloc[0])} directions as its effective null space) the "
                "candidates' null-space share has median "
                f"{candidates['null_fraction'].median():.3f} against "
                f"{pool['null_fraction'].median():.3f} for their layers' neurons (median "
                f"percentile in their layer {chosen['null'].median():.0%}), and their logit effect "
                f"per unit of lens norm sits at median percentile {chosen['rel'].median():.0%} "
                "(low: the unembedding barely reads them)."
            )
        if "verdict_abs_d_entropy" in candidates:
            up_h, down_h = _separated(candidates, "abs_d_entropy")
            up_k, _ = _separated(candidates, "kl")
            up_t, down_t = _separated(candidates, "top1_change")
            n_tokens = int(candidates["n_tokens"].iloc[0])
            ratio = candidates["matched_norm_ratio"]
            lines.append(
                f"Each candidate mean-ablated alone ({n_tokens:,} held-out tokens, against "
                f"{int(candidates['n_draws'].iloc[0])} random neurons of its layer and matched "
                "norm, their norms "
                f"{ratio.min():.2f}–{ratio.max():.2f}× "
                "the candidate's): the output's entropy changes more than for the matched neurons "
                f"at {up_h} of {n} candidates (less at {down_h}), the KL is larger at {up_k}, the "
                f"top-1 token changes more often at {up_t} (less at {down_t}). Each verdict: a "
                "matched permutation test over sequences, Holm-corrected over the experiment's "
                f"{3 * (n + len(joint))} comparisons (family-wise 0.05), and the candidate beyond "
                "every matched draw. Mean |ΔH| / KL: candidates "
                f"{candidates['entropy_per_kl'].mean():.2f}, matched random "
                f"{candidates['random_entropy_per_kl'].mean():.2f}."
            )
            entropy_like = candidates[candidates["entropy_account"].astype(bool)]
            lines.append(
                "The entropy-neuron account (|ΔH| above the matched neurons', the top-1 token "
                f"changed at most {settings.get('top1_margin', 0.01):g} of positions more often "
                "than theirs (upper end of the paired 95% interval), and |ΔH| / KL with its 95% "
                f"interval above every matched draw's) fits {len(entropy_like)} of {n}: "
                + (
                    ", ".join(f"{int(r.layer)}.{int(r.neuron)}" for r in entropy_like.itertuples())
                    or "none"
                )
                + "."
            )
        if not joint.empty:
            row = joint.iloc[0]
            lines.append(
                f"All {int(row['n_neurons'])} together: |ΔH| {row['abs_d_entropy']:.4f} "
                f"[{row['abs_d_entropy_lo']:.4f}, {row['abs_d_entropy_hi']:.4f}] vs random sets "
                f"{row['random_abs_d_entropy']:.4f}; KL {words.number(row['kl'])} vs "
                f"{words.number(row['random_kl'])}; top-1 changed {row['top1_change']:.4f} vs "
                f"{row['random_top1_change']:.4f}."
            )
    reference_path = existing(files.get("reference"))
    reference = read_tsv(reference_path) if reference_path is not None else pd.DataFrame()
    if not reference.empty:
        hits = reference[reference["is_candidate"].astype(bool)]
        named = "; ".join(
            f"{int(r.layer)}.{int(r.neuron)}: "
            f"{'a candidate' if r.is_candidate else 'not a candidate'} (internal share "
            f"{r.internal_fraction:.3f}, norm rank {int(r.norm_rank_in_layer)} in its layer)"
            for r in reference.itertuples()
        )
        lines.append(
            f"Published entropy neurons ({reference['reference'].iloc[0]}): ours include "
            f"{len(hits)} of {len(reference)}. {named}."
        )
    blocks.append(Text(" ".join(lines)))
    blocks += figure(
        files.get("figure"),
        (
            f"MLP neurons of {run}: output weight norm ||w|| (log scale) against the "
            f"internal share of the lens-space write, k = {k}; colour: block; circles: the "
            f"{len(candidates)} candidates (share ≥ {threshold:g}, largest norms)"
            + ("; crosses: the published entropy neurons." if not reference.empty else ".")
        ),
    )
    if not candidates.empty:
        blocks.append(
            Table(
                tables.neuron_candidates_table(candidates),
                (
                    "Candidates, each mean-ablated alone: abs ΔH = mean absolute change of the "
                    "output's entropy (nats), KL(model ‖ ablated), share of positions whose top-1 "
                    "token changes; 'random': random neurons of the same layer and matched norm "
                    "(mean over draws); 'diff': paired difference; [ ]: "
                    f"{words.interval(context.n_resamples)} (BCa for the top-1 share, whose "
                    "per-sequence values are discrete)."
                ),
                markdown_path=files.get("table"),
            )
        )
    return Section("neurons", "Single neurons (entropy-neuron candidates)", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """How many candidates the entropy-neuron account fits (or that there are none)."""
    path = existing(files.get("neurons"))
    if path is None:
        return None
    candidates = read_tsv(files["candidates"])
    threshold = context.config.get("neurons", {}).get("min_internal_share", 0.9)
    if candidates.empty:
        sentence = (
            f"No MLP neuron writes {threshold:g} or more of its lens-space output into the "
            "internal subspace: there are no entropy-neuron candidates."
        )
    elif "entropy_account" in candidates:
        fits = int(candidates["entropy_account"].astype(bool).sum())
        sentence = (
            f"The entropy-neuron account fits {fits} of the {len(candidates)} candidates "
            f"(neurons writing {threshold:g} or more of their lens-space output into the "
            "internal subspace, largest norms first)."
        )
    else:
        sentence = f"{len(candidates)} neurons are entropy-neuron candidates."
    return Finding("Single neurons", sentence)
