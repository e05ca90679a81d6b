"""Statistics over seeds: mean ± standard error per group, pass@k curves, the baselines table."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

#: metrics of the baseline comparison table, in display order
COMPARISON_METRICS = (
    "policy.mean_at_k",
    "policy.p_correct_exact",
    "policy.p_correct_target",
    "policy.pass_at_1",
    "policy.pass_at_4",
    "policy.pass_at_16",
    "policy.unique_correct",
    "policy.coverage",
    "policy.tv_target",
    "policy.kl_target",
    "policy.tv_rewarded",
    "policy.kl_rewarded",
    "train.wall_s",
    "train.steps",
    "train.tokens_generated",
)


def mean_se(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, standard error (sd/√n, n−1 in sd) and n over the rows of each group.

    Columns: ``by..., {metric}.mean, {metric}.se, n``. A metric missing from a run counts
    as missing for that run (never as zero); se is NaN where a group has one run.
    """
    present = [m for m in metrics if m in df]
    g = df.groupby(list(by), sort=True)[present]
    mean, sd, n = g.mean(), g.std(ddof=1), g.count()
    out = pd.DataFrame(index=mean.index)
    for m in present:
        out[f"{m}.mean"] = mean[m]
        out[f"{m}.se"] = sd[m] / np.sqrt(n[m])
    out["n"] = g.size()
    return out.reset_index()


def pass_at_k_curves(df: pd.DataFrame, by: Sequence[str] = ("algorithm",)) -> pd.DataFrame:
    """Long table of unbiased pass@k against k, for π_ref and the trained policy:
    columns ``by..., model ("ref" | "policy"), k, mean, se, n`` (mean ± se over seeds)."""
    rows = []
    for model in ("ref", "policy"):
        cols = {int(c.rsplit("_", 1)[1]): c for c in df if c.startswith(f"{model}.pass_at_")}
        if not cols:
            continue
        agg = mean_se(df, list(by), list(cols.values()))
        for k, col in sorted(cols.items()):
            part = agg[list(by) + ["n"]].copy()
            part["model"], part["k"] = model, k
            part["mean"], part["se"] = agg[f"{col}.mean"], agg[f"{col}.se"]
            rows.append(part)
    return pd.concat(rows, ignore_index=True)[[*by, "model", "k", "mean", "se", "n"]]


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3g}" if math.isnan(se) else f"{mean:.3g} ± {se:.2g}"


def comparison_table(df: pd.DataFrame, metrics: Sequence[str] = COMPARISON_METRICS) -> pd.DataFrame:
    """The baselines table: one row per algorithm, ``mean ± se`` over seeds per metric."""
    agg = mean_se(df, ["algorithm"], metrics)
    table = pd.DataFrame({"algorithm": agg.algorithm, "seeds": agg.n})
    for m in metrics:
        if f"{m}.mean" in agg:
            table[m] = [_fmt(a, b) for a, b in zip(agg[f"{m}.mean"], agg[f"{m}.se"])]
    return table
