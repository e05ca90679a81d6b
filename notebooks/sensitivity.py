# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sensitivity of DISA to β and to the proposal strength λ
#
# Reads the sweeps of `python run.py -m experiment=sensitivity_beta seed=0,1,2` and
# `python run.py -m experiment=sensitivity_proposal seed=0,1,2` (or any sweep over `beta`
# and/or `proposal.strength`). For each swept setting: the trained policy's metrics
# (mean ± s.e. over seeds; π_ref's value dashed) and the accuracy of its frozen anchor.
# When a sweep varies both, one line per value of the other.
#
# Sweep directories: `$DISA_SWEEP_DIR` (several separated by `:`), else the newest
# `sensitivity_beta` and `sensitivity_proposal` multiruns, else the newest multirun. Each
# sweep's figure is saved into it as PNG.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from disa import analysis

# %% tags=["parameters"]
SWEEP_DIRS = [
    str(d)
    for d in analysis.sweep_dirs_from_env()
    or analysis.latest_sweeps("sensitivity_beta", "sensitivity_proposal")
]
METRICS = [
    "policy.mean_at_k",
    "policy.pass_at_1",
    "policy.coverage",
    "policy.unique_correct",
    "policy.tv_target",
    "policy.kl_target",
    "anchor.mean_abs_error",
    "anchor.mean_ess_frac",
]

# %%
AXES = {"beta": "β", "proposal.strength": "λ (proposal strength)"}
sweeps = {d: analysis.load_sweep(d) for d in SWEEP_DIRS}
for d, runs in sweeps.items():
    print(f"{d}: {len(runs)} runs; varying: {analysis.varying(runs)}")


# %%
def plot_against(runs: pd.DataFrame, axis: str, other: str | None) -> plt.Figure:
    """One panel per metric: mean ± s.e. over seeds against ``axis``, a line per ``other``."""
    metrics = [m for m in METRICS if m in runs]
    ncol = 4
    nrow = int(np.ceil(len(metrics) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), squeeze=False)
    by = [axis] + ([other] if other else [])
    refs = [m.replace("policy.", "ref.") for m in metrics if m.startswith("policy.")]
    agg = analysis.mean_se(runs, by, metrics + refs)
    for ax, m in zip(axes.flat, metrics):
        for val, d in agg.groupby(other) if other else [(None, agg)]:
            label = None if other is None else f"{AXES.get(other, other).split()[0]}={val:g}"
            ax.errorbar(
                d[axis],
                d[f"{m}.mean"],
                yerr=d[f"{m}.se"].fillna(0),
                fmt="o-",
                ms=4,
                capsize=2,
                label=label,
            )
            ref = m.replace("policy.", "ref.")
            if ref != m and f"{ref}.mean" in d:
                ax.plot(
                    d[axis],
                    d[f"{ref}.mean"],
                    "--",
                    color="gray",
                    label="π_ref" if val is None else None,
                )
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(AXES.get(axis, axis))
        if axis == "beta":
            ax.set_xscale("log", base=2)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


for d, runs in sweeps.items():
    swept = [a for a in AXES if a in analysis.varying(runs)]
    if not swept:
        print(f"{d}: neither β nor λ varies; nothing to plot")
    for axis in swept:
        other = next((a for a in swept if a != axis), None)
        fig = plot_against(runs, axis, other)
        name = "sensitivity_" + ("beta" if axis == "beta" else "strength") + ".png"
        fig.savefig(Path(d) / name, dpi=110)
        print("saved", Path(d) / name)
        plt.show()

# %% [markdown]
# ## The numbers (mean ± s.e. over seeds)

# %%
tables = []
for runs in sweeps.values():
    swept = [a for a in AXES if a in analysis.varying(runs)] or ["beta"]
    tables.append(analysis.mean_se(runs, swept, [m for m in METRICS if m in runs]))
pd.concat(tables, ignore_index=True).round(4)
