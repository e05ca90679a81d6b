"""Figures of a sweep, drawn without pyplot (no backend switch, no global figure state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from disa.analysis.stats import mean_se


def plot_comparison(
    df: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = ("policy.mean_at_k", "policy.coverage", "policy.tv_target"),
) -> Path:
    """Bar chart (mean ± se over seeds) of a few metrics per algorithm, with π_ref's value
    as a dashed line; saved as PNG."""
    from matplotlib.figure import Figure

    metrics = [m for m in metrics if m in df]
    agg = mean_se(df, ["algorithm"], metrics)
    fig = Figure(figsize=(4 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        yerr = agg[f"{m}.se"].fillna(0)
        ax.bar(agg.algorithm, agg[f"{m}.mean"], yerr=yerr, capsize=3, color="#4C72B0")
        ref = m.replace("policy.", "ref.")
        if ref in df:
            ax.axhline(df[ref].mean(), ls="--", color="gray", label="π_ref")
            ax.legend(fontsize=8)
        ax.set_title(m.removeprefix("policy."))
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
