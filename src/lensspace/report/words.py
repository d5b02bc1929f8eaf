"""Numbers and words shared by the sections: KL formatting, token counts, layer lists, and the
phrases that name the ablation variants."""

from __future__ import annotations

import pandas as pd

BASIS_TEXT = {
    "unembed": "SVD of the raw unembedding W_U",
    "unembed_centered": (
        "SVD of W_U with its vocabulary mean removed and the final norm's gain folded in"
    ),
    "lens_pullback": (
        "the lens-space ablation of the unembed subspace carried exactly into the residual "
        "through translator i, h' = h − (I + A_i)^-1 Q Q^T (T_i(h) − c), so that "
        "T_i(h') = ablate(T_i(h))"
    ),
    "random": "seeded random k-dimensional subspaces (the control; independent draws per layer)",
    "random_lens_pullback": (
        "the lens_pullback operation on seeded random lens-space subspaces (its control)"
    ),
    "embed": "SVD of the token embedding W_E",
}
MODE_TEXT = {
    "zero": "zero (the component is projected out)",
    "mean": "mean (the component is replaced by its training-set mean)",
}
SITE_TEXT = {
    "pre_norm": "pre_norm (before the final norm)",
    "post_norm": "post_norm (after the final norm, its scale frozen from the intact vector)",
    "residual": "residual (the residual stream h_i itself)",
    "embedding": "embedding (the token embedding, at the embedding lens's input)",
}
SUBSPACE_TEXT = {
    "output": "output (top-k right singular vectors)",
    "internal": "internal (bottom-k right singular vectors)",
    "random": "random (seeded k-dim control)",
}


def number(value: float) -> str:
    """KL values: three decimals, or three significant digits below 0.01 (tiny models)."""
    if pd.isna(value):
        return ""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def tokens(frame: pd.DataFrame) -> str:
    """The held-out token count of a table's rows: one number, or its range."""
    counts = sorted(set(int(n) for n in frame["n_tokens"]))
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"


def interval(n_resamples: int) -> str:
    return (
        f"95% studentized bootstrap interval over sequences ({n_resamples:,} resamples)"
        if n_resamples
        else "95% studentized bootstrap interval over sequences"
    )


def layers(values) -> str:
    """``layer 3``, ``layers 0–11`` (a run of layers) or ``layers 0, 5, 11``."""
    found = sorted(set(int(v) for v in values))
    if len(found) == 1:
        return f"layer {found[0]}"
    if found == list(range(found[0], found[-1] + 1)):
        return f"layers {found[0]}–{found[-1]}"
    return "layers " + ", ".join(map(str, found))


def listing(values, words: dict) -> str:
    return "; ".join(words.get(v, str(v)) for v in values)


def ratio(value: float) -> str:
    """A ratio of two KLs: two significant digits (``3.2``), whole numbers from 10, and as many
    digits as it takes not to round a ratio above 1 to ``1`` (``1.04``)."""
    if value >= 10:
        return f"{value:.0f}"
    digits = 2
    while f"{value:.{digits}g}" == "1" and value != 1 and digits < 6:
        digits += 1
    return f"{value:.{digits}g}"


def times(value: float) -> str:
    """A ratio as words: ``3.2 times``."""
    return f"{ratio(value)} times"


def count(n: int, noun: str) -> str:
    """``1 direction``, ``6 directions``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
