"""Figures in one style: seaborn, paper column width, intervals as bands."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = {"output": "#c0392b", "internal": "#2471a3", "random": "#7f8c8d",
           "tuned": "#1e8449", "logit": "#7f8c8d"}


def style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9)


def _band(ax, frame: pd.DataFrame, label: str, color: str, dashed: bool = False) -> None:
    frame = frame.sort_values("layer")
    ax.plot(frame["layer"], frame["kl"], color=color, label=label, lw=1.4,
            ls="--" if dashed else "-", marker="o", ms=2.5)
    ax.fill_between(frame["layer"], frame["kl_lo"], frame["kl_hi"], color=color, alpha=0.2, lw=0)


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    fig.savefig(partial, dpi=200, bbox_inches="tight")
    plt.close(fig)
    partial.replace(path)


def ablation_figure(ablation: pd.DataFrame, title: str, path: str | Path) -> None:
    """KL against layer per subspace; one panel per (mode, site) row and basis column, per k."""
    style()
    bases = sorted(b for b in ablation["basis"].unique() if b != "random")
    rows = sorted({(m, s) for m, s in zip(ablation["mode"], ablation["site"])})
    ks = sorted(ablation["k"].unique())
    fig, axes = plt.subplots(len(rows) * len(ks), max(1, len(bases)), squeeze=False, sharex=True,
                             figsize=(3.3 * max(1, len(bases)), 2.3 * len(rows) * len(ks)))
    for r, (k, (mode, site)) in enumerate((k, ms) for k in ks for ms in rows):
        cell = ablation[(ablation["k"] == k) & (ablation["mode"] == mode) & (ablation["site"] == site)]
        for c, basis in enumerate(bases or ["random"]):
            ax = axes[r, c]
            for subspace in ("output", "internal"):
                part = cell[(cell["basis"] == basis) & (cell["subspace"] == subspace)]
                if not part.empty:
                    _band(ax, part, subspace, PALETTE[subspace])
            control = cell[cell["subspace"] == "random"]
            if not control.empty:
                _band(ax, control, "random (control)", PALETTE["random"], dashed=True)
            ax.set_title(f"{basis} | {mode}, {site} | k={k}", fontsize=8)
            ax.set_ylabel("KL (nats)")
            ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def lens_quality_figure(lens_eval: pd.DataFrame, title: str, path: str | Path) -> None:
    """Held-out KL(final || lens) by layer, tuned vs logit lens, log scale."""
    style()
    fig, ax = plt.subplots(figsize=(3.4, 2.4))
    for lens in ("logit", "tuned"):
        _band(ax, lens_eval[lens_eval["lens"] == lens], f"{lens} lens", PALETTE[lens], dashed=lens == "logit")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(final || lens), nats")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def heads_figure(heads: pd.DataFrame, test: pd.Series, title: str, path: str | Path) -> None:
    """Induction score vs output fraction per head, coloured by layer, with the test result."""
    style()
    fig, ax = plt.subplots(figsize=(3.6, 2.8))
    points = ax.scatter(heads["induction_score"], heads["output_fraction"], c=heads["layer"],
                        cmap="viridis", s=12, edgecolors="none")
    fig.colorbar(points, ax=ax, label="layer")
    ax.axvline(test["threshold"], color="#7f8c8d", ls="--", lw=0.8)
    ax.set_xlabel("induction score")
    ax.set_ylabel(f"output fraction of write (k={int(heads['k'].iloc[0])})")
    p = "n/a" if pd.isna(test["p_value"]) else f"{test['p_value']:.3g}"
    ax.set_title(f"{title}\n{int(test['n_induction'])} induction heads; "
                 f"within-depth difference {test['statistic']:.3f}, p = {p}", fontsize=8)
    fig.tight_layout()
    save(fig, path)
