"""Statistics over seeds: mean ± standard error per group, pass@k curves, the baselines table,
and paired differences between arms with a bootstrap over seeds × prompts."""

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


#: per-prompt metrics of the paired comparisons (columns of ``eval_per_prompt.parquet``)
PAIRED_METRICS = (
    "mean_at_k",
    "p_correct_exact",
    "pass_at_16",
    "unique_correct",
    "coverage",
    "tv_target",
    "tv_rewarded",
)
#: every metric column of ``eval_per_prompt.parquet`` (the rest are run settings and ids)
PER_PROMPT_METRICS = (
    *PAIRED_METRICS,
    "solved",
    "kl_target",
    "kl_rewarded",
    "p_correct_target",
    *(f"pass_at_{k}" for k in (1, 2, 4, 8)),
)
#: the arm name of π_ref's rows in :func:`with_arms`
REF_ARM = "π_ref"


def with_arms(
    per_prompt: pd.DataFrame, by: str = "algorithm", pair_on: Sequence[str] = ("seed", "prompt_id")
) -> pd.DataFrame:
    """The per-prompt table of a sweep (:func:`disa.analysis.io.load_per_prompt`) with an
    ``arm`` column: each trained policy's row is the arm named by its ``by`` value; π_ref's rows,
    which every run of a seed repeats, are one arm :data:`REF_ARM`, kept once per ``pair_on``.

    If π_ref's rows for the same ``pair_on`` differ between runs (the sweep varies β or the
    backbone, say, besides ``by``), there is no single π_ref to pair with: ``ValueError``."""
    keys = list(pair_on)
    policy = per_prompt[per_prompt.model == "policy"].copy()
    policy["arm"] = policy[by].astype(str)
    ref = per_prompt[per_prompt.model == "ref"]
    ref = ref.drop_duplicates(subset=keys + [c for c in PER_PROMPT_METRICS if c in ref]).copy()
    if ref.duplicated(subset=keys).any():
        raise ValueError(
            f"π_ref's per-prompt metrics differ between runs with the same {keys}: the sweep varies "
            f"more than {by!r}; compare within one setting (filter the table first)"
        )
    ref["arm"] = REF_ARM
    return pd.concat([policy, ref], ignore_index=True)


#: the columns of :func:`paired_differences` (a table of several settings adds theirs)
PAIRED_COLUMNS = (
    "arm",
    "baseline",
    "metric",
    "diff",
    "ci_low",
    "ci_high",
    "significant",
    "seeds",
    "prompts",
)


def paired_differences(
    table: pd.DataFrame,
    baseline: str,
    metrics: Sequence[str] = PAIRED_METRICS,
    *,
    arm: str = "arm",
    pair_on: Sequence[str] = ("seed", "prompt_id"),
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Every arm against ``baseline``, metric by metric: the paired difference and its
    bootstrap confidence interval over seeds × prompts.

    ``table`` holds one row per ``(arm, *pair_on)`` (e.g. :func:`with_arms` of a sweep's
    per-prompt table). For an arm ``a`` and a metric, ``d[s, q] = a[s, q] − baseline[s, q]`` on
    the seeds ``s`` and prompts ``q`` both have; the estimate is the mean of ``d``. The
    interval resamples seeds and prompts independently, with replacement (a two-way bootstrap:
    both the training randomness and the choice of prompts vary), takes the mean of ``d`` over
    each resampled grid, and reports the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of
    ``n_boot`` such means. A cell where either side is missing (``unique_correct`` of an
    unsolved prompt) is left out of every mean. With few seeds the seed resampling is coarse
    (3 seeds give 10 distinct multisets); the interval is then mostly the prompts'.

    Columns: ``arm, baseline, metric, diff, ci_low, ci_high, significant`` (the interval
    excludes 0), ``seeds, prompts`` (the grid's size). Deterministic given ``seed``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}; allowed: a number in (0, 1)")
    keys = list(pair_on)
    if len(keys) != 2:
        raise ValueError(f"pair_on={pair_on!r}; allowed: two columns, the seed and the prompt")
    dup = table.duplicated(subset=[arm, *keys])
    if dup.any():
        raise ValueError(
            f"{int(dup.sum())} rows repeat an ({arm}, {', '.join(keys)}); allowed: one row each"
        )
    if baseline not in set(table[arm]):
        raise ValueError(
            f"baseline={baseline!r} is not an arm; allowed: {sorted(set(map(str, table[arm])))}"
        )
    base = table[table[arm] == baseline].set_index(keys)
    rng = np.random.default_rng(seed)
    rows = []
    for name, other in table[table[arm] != baseline].groupby(arm, sort=True):
        other = other.set_index(keys)
        for m in metrics:
            if m not in table:
                continue
            # aligned on (seed, prompt); a missing side drops the cell
            d = (other[m] - base[m]).dropna()
            if d.empty:
                continue
            grid = d.unstack(keys[1])  # [S, P], NaN where a cell is missing
            D, M = np.nan_to_num(grid.to_numpy(np.float64)), (~grid.isna()).to_numpy(np.float64)
            S, P = D.shape
            # [B, S] seed counts
            ws = rng.multinomial(S, np.full(S, 1 / S), size=n_boot).astype(np.float64)
            # [B, P] prompt counts
            wp = rng.multinomial(P, np.full(P, 1 / P), size=n_boot).astype(np.float64)
            num = np.einsum("bs,sp,bp->b", ws, D * M, wp)
            den = np.einsum("bs,sp,bp->b", ws, M, wp)
            means = num[den > 0] / den[den > 0]
            low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
            rows.append(
                {
                    "arm": name,
                    "baseline": baseline,
                    "metric": m,
                    "diff": float(d.mean()),
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "significant": bool(low > 0 or high < 0),
                    "seeds": S,
                    "prompts": P,
                }
            )
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def paired_table(diffs: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_differences` as a table to read: one row per arm, one column per metric,
    ``+0.12 [+0.08, +0.16]``, marked ``*`` where the interval excludes 0."""
    out = pd.DataFrame({"arm": sorted(set(diffs.arm), key=_arm_order)})
    for m in dict.fromkeys(diffs.metric):
        cells = diffs[diffs.metric == m].set_index("arm")
        out[m] = [_fmt_diff(cells.loc[a]) if a in cells.index else "–" for a in out.arm]
    return out


def _arm_order(arm: str) -> tuple:
    """Numeric arms (a swept K or β) in numeric order, before named ones in alphabetical order."""
    try:
        return (0, float(arm), "")
    except ValueError:
        return (1, 0.0, arm)


def _fmt_diff(row: pd.Series) -> str:
    mark = "*" if row.significant else ""
    return f"{row['diff']:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]{mark}"
