"""Figures of a sweep, drawn without pyplot (no backend switch, no global figure state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


#: FlowRL's logged calibration of log Z_φ against the exact log Z, and what each panel shows
LOG_Z_PANELS = (
    ("train/log_z_phi_error", "mean error (log Z_φ − log Z)", "error"),
    ("train/log_z_phi_abs_error", "mean |error|", "abs_error"),
    ("train/log_z_phi_corr", "correlation across prompts", "corr"),
)


def anchor_calibration(anchors: pd.DataFrame) -> pd.DataFrame:
    """Per run (``seed``): the frozen anchor's mean error, mean |error| and correlation across
    prompts of log Ẑ against the exact log Z (``anchors``: :func:`disa.analysis.io.load_anchors`
    of runs on an enumerable task)."""
    rows = []
    for seed, a in anchors.groupby("seed"):
        rows.append(
            {
                "seed": seed,
                "error": float(a.error.mean()),
                "abs_error": float(a.error.abs().mean()),
                "corr": float(np.corrcoef(a.log_z_hat, a.log_z)[0, 1]),
            }
        )
    return pd.DataFrame(rows)


def plot_log_z_calibration(curves: pd.DataFrame, anchors: pd.DataFrame, path: str | Path) -> Path:
    """FlowRL's learned log Z_φ(q) against the exact log Z(q) of the training prompts over
    training (``curves``: the training curves of FlowRL runs, :func:`disa.analysis.io.load_training_curves`),
    beside DISA's frozen log Ẑ(q) (``anchors``: its runs' anchor tables), whose error is fixed
    before training starts. Mean ± s.e. over seeds, one panel per statistic; saved as PNG."""
    from matplotlib.figure import Figure

    frozen = anchor_calibration(anchors)
    # online runs log once per rollout: the CSV's "step" counts rollouts, this column optimizer steps
    x = "train/optimizer_steps" if "train/optimizer_steps" in curves else "step"
    fig = Figure(figsize=(12, 3.3))
    axes = fig.subplots(1, len(LOG_Z_PANELS))
    for ax, (col, title, stat) in zip(axes, LOG_Z_PANELS):
        if col in curves:
            by_step = curves.dropna(subset=[col]).groupby(x)[col]
            mean, se = by_step.mean(), by_step.std(ddof=1) / np.sqrt(by_step.count())
            ax.plot(mean.index, mean.to_numpy(), color="#C44E52", label="FlowRL log Z_φ (learned)")
            ax.fill_between(
                mean.index,
                (mean - se.fillna(0)).to_numpy(),
                (mean + se.fillna(0)).to_numpy(),
                color="#C44E52",
                alpha=0.2,
                lw=0,
            )
        m = frozen[stat].mean()
        s = frozen[stat].std(ddof=1) / np.sqrt(len(frozen)) if len(frozen) > 1 else 0.0
        ax.axhline(m, color="#4C72B0", label="DISA log Ẑ (frozen)")
        ax.axhspan(m - s, m + s, color="#4C72B0", alpha=0.2, lw=0)
        if stat != "corr":
            ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
