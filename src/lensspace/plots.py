"""Figures in one style: seaborn, paper column width, intervals as bands."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PALETTE = {
    "output": "#c0392b",
    "internal": "#2471a3",
    "random": "#7f8c8d",
    "tuned": "#1e8449",
    "logit": "#7f8c8d",
}


def style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9)


def _band(ax, frame: pd.DataFrame, label: str, color: str, dashed: bool = False) -> None:
    frame = frame.sort_values("layer")
    ax.plot(
        frame["layer"],
        frame["kl"],
        color=color,
        label=label,
        lw=1.4,
        ls="--" if dashed else "-",
        marker="o",
        ms=2.5,
    )
    ax.fill_between(frame["layer"], frame["kl_lo"], frame["kl_hi"], color=color, alpha=0.2, lw=0)


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    fig.savefig(partial, dpi=200, bbox_inches="tight")
    plt.close(fig)
    partial.replace(path)


def _controls(cell: pd.DataFrame, basis: str) -> list[tuple[str, pd.DataFrame]]:
    """The random controls of ``basis``'s panel, each its own line: the control made by the
    basis's own operation (``random_<basis>``) where the grid has one, else the plain random
    subspaces, else every random basis there is."""
    random = cell[cell["subspace"] == "random"]
    names = list(dict.fromkeys(random["basis"]))
    own = f"random_{basis}"
    chosen = [own] if own in names else ["random"] if "random" in names else names
    return [(name, random[random["basis"] == name]) for name in chosen]


def _control(ax, frame: pd.DataFrame, label: str) -> None:
    """A random control: the mean over its draws as a dashed line, the draws' range as a band
    (the mean's interval where there is one draw)."""
    frame = frame.sort_values("layer")
    spread = "draw_min" in frame and frame["n_draws"].max() > 1
    lo, hi = ("draw_min", "draw_max") if spread else ("kl_lo", "kl_hi")
    color = PALETTE["random"]
    ax.plot(
        frame["layer"], frame["kl"], color=color, label=label, lw=1.4, ls="--", marker="o", ms=2.5
    )
    ax.fill_between(frame["layer"], frame[lo], frame[hi], color=color, alpha=0.2, lw=0)


def ablation_axes(ablation: pd.DataFrame, title: str):
    """KL against layer per subspace; one panel per (mode, site) row and basis column, per k.
    Each line is a function of the layer: one per subspace and one per random control."""
    style()
    bases = sorted(b for b in ablation["basis"].unique() if not b.startswith("random"))
    if not bases:
        bases = sorted(ablation["basis"].unique())
    rows = sorted({(m, s) for m, s in zip(ablation["mode"], ablation["site"])})
    ks = sorted(ablation["k"].unique())
    fig, axes = plt.subplots(
        len(rows) * len(ks),
        len(bases),
        squeeze=False,
        sharex=True,
        figsize=(3.3 * len(bases), 2.3 * len(rows) * len(ks)),
        layout="constrained",
    )
    for r, (k, (mode, site)) in enumerate((k, ms) for k in ks for ms in rows):
        cell = ablation[
            (ablation["k"] == k) & (ablation["mode"] == mode) & (ablation["site"] == site)
        ]
        for c, basis in enumerate(bases):
            ax = axes[r, c]
            for subspace in ("output", "internal"):
                part = cell[(cell["basis"] == basis) & (cell["subspace"] == subspace)]
                if not part.empty:
                    _band(ax, part, subspace, PALETTE[subspace])
            for name, control in _controls(cell, basis):
                if not control.empty:
                    label = "random (control)" if name == "random" else f"{name} (control)"
                    _control(ax, control, label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{basis} | {mode}, {site} | k={k}", fontsize=8)
            ax.set_ylabel("KL (nats)")
            ax.set_xlabel("layer")
    for ax in axes[0]:  # each column has its own control
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def ablation_figure(ablation: pd.DataFrame, title: str, path: str | Path) -> None:
    """:func:`ablation_axes`, saved to ``path``."""
    save(ablation_axes(ablation, title), path)


def lens_quality_figure(lens_eval: pd.DataFrame, title: str, path: str | Path) -> None:
    """Held-out KL(final || lens) by layer, tuned vs logit lens, log scale."""
    style()
    fig, ax = plt.subplots(figsize=(3.4, 2.4), layout="constrained")
    for lens in ("logit", "tuned"):
        _band(
            ax,
            lens_eval[lens_eval["lens"] == lens],
            f"{lens} lens",
            PALETTE[lens],
            dashed=lens == "logit",
        )
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(final || lens), nats")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    save(fig, path)


def heads_figure(heads: pd.DataFrame, test: pd.Series, title: str, path: str | Path) -> None:
    """Induction score vs output fraction per head, coloured by layer, with the test result."""
    style()
    fig, ax = plt.subplots(figsize=(3.6, 2.8), layout="constrained")
    points = ax.scatter(
        heads["induction_score"],
        heads["output_fraction"],
        c=heads["layer"],
        cmap="viridis",
        s=12,
        edgecolors="none",
    )
    fig.colorbar(points, ax=ax, label="layer")
    ax.axvline(test["threshold"], color="#7f8c8d", ls="--", lw=0.8)
    ax.set_xlabel("induction score")
    ax.set_ylabel(f"lens-space output share (k={int(heads['k'].iloc[0])})")
    p = "n/a" if pd.isna(test["p_value"]) else f"{test['p_value']:.3g}"
    effect = (
        "n/a"
        if pd.isna(test["statistic"])
        else f"{test['statistic']:.3f} [{test['effect_lo']:.3f}, {test['effect_hi']:.3f}]"
    )
    ax.set_title(
        f"{title}\n{int(test['n_induction'])} induction heads; within-layer difference "
        f"{effect}, p = {p}",
        fontsize=8,
    )
    save(fig, path)


def embedding_lens_figure(
    fit: pd.DataFrame, ablation: pd.DataFrame, title: str, path: str | Path
) -> None:
    """Left: R² and route KLs of E_i by layer. Right: KL of ablating W_E's directions by layer."""
    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.8, 2.6), layout="constrained")
    fit = fit.sort_values("layer")
    for route, color in (("lens", PALETTE["tuned"]), ("downstream", PALETTE["output"])):
        band = fit.rename(
            columns={
                f"kl_{route}_route": "kl",
                f"kl_{route}_route_lo": "kl_lo",
                f"kl_{route}_route_hi": "kl_hi",
            }
        )
        _band(left, band, f"KL, {route} route", color)
    left.set_ylabel("KL(model || E_i route), nats")
    left.set_xlabel("layer")
    r2 = left.twinx()
    r2.plot(fit["layer"], fit["r2"], color="black", ls=":", marker="s", ms=2.5, label="R²")
    r2.set_ylabel("R² of E_i")
    r2.set_ylim(0, 1.05)
    r2.grid(False)
    left.legend(fontsize=7, frameon=False, loc="center left")
    k = int(ablation["k"].min())
    mode = "zero" if "zero" in set(ablation["mode"]) else ablation["mode"].iloc[0]
    for subspace, label in (
        ("output", "input (top-k)"),
        ("internal", "bottom-k"),
        ("random", "random"),
    ):
        part = ablation[
            (ablation["subspace"] == subspace) & (ablation["k"] == k) & (ablation["mode"] == mode)
        ]
        if not part.empty:
            _band(right, part, label, PALETTE[subspace], dashed=subspace == "random")
    right.set_ylabel(f"KL, {mode}-ablating k={k} W_E directions")
    right.set_xlabel("layer")
    right.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def swap_heatmaps(swaps: pd.DataFrame, n_layers: int, title: str, path: str | Path) -> None:
    """KL of swapping blocks i and j, one heatmap per space, one shared colour scale."""
    import numpy as np

    style()
    spaces = [s for s in ("native", "lens", "lens_ridge") if s in set(swaps["space"])]
    vmax = float(swaps["kl"].max()) if len(swaps) else 1.0
    fig, axes = plt.subplots(
        1, len(spaces), figsize=(3.3 * len(spaces) + 0.6, 3.0), squeeze=False, layout="constrained"
    )
    for ax, space in zip(axes[0], spaces):
        grid = np.full((n_layers, n_layers), np.nan)
        for row in swaps[swaps["space"] == space].itertuples():
            grid[row.i, row.j] = grid[row.j, row.i] = row.kl
        sns.heatmap(
            grid,
            ax=ax,
            vmin=0,
            vmax=vmax,
            cmap="magma_r",
            square=True,
            cbar_kws={"label": "KL (nats)"},
            mask=np.isnan(grid),
        )
        ax.grid(False)
        ax.set_title(f"{space} space", fontsize=9)
        ax.set_xlabel("block j")
        ax.set_ylabel("block i")
    fig.suptitle(title, fontsize=9)
    save(fig, path)
