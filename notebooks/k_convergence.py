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
# # DISA's convergence in K
#
# The paper's central promise: the policy matches the target p* ∝ π_ref·exp(β r) once the
# anchor log Ẑ and the cached data are good enough. Reads a sweep of
# `python run.py -m experiment=k_convergence` (DISA, K = 8 … 512 samples per training prompt,
# 3 seeds, evaluated on the training prompts and on the held-out ones, the same number of
# optimizer steps for every K) and draws the exact TV to p* and the exact P(correct) against K,
# mean ± s.e. over seeds, with π_ref's and p*'s values.
#
# Sweep directory: `$DISA_SWEEP_DIR`, else the newest multirun named after `k_convergence`.
# The figure is saved there as `k_convergence.png`.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from disa import analysis

# %% tags=["parameters"]
SWEEP_DIR = str((analysis.sweep_dirs_from_env() or [analysis.latest_sweep("k_convergence")])[0])

# %%
runs = analysis.load_sweep(SWEEP_DIR)
K = "proposal.num_samples"
print(f"{SWEEP_DIR}: {len(runs)} runs; varying: {analysis.varying(runs)}")
splits = sorted(runs["eval.split"].unique(), reverse=True)  # train first
agg = analysis.mean_se(
    runs,
    ["eval.split", K],
    [
        "policy.tv_target",
        "policy.p_correct_exact",
        "ref.tv_target",
        "ref.p_correct_exact",
        "policy.p_correct_target",
        "anchor.mean_abs_error",
    ],
)

# %% [markdown]
# ## TV to p* and P(correct) against K
#
# Solid: the trained policy (mean ± s.e. over seeds). Dashed: π_ref. Dotted (right panel):
# p*'s own P(correct), the value a policy that matches the target reaches.

# %%
colors = {"train": "#4C72B0", "test": "#C44E52"}
names = {"train": "training prompts", "test": "held-out prompts"}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for split in splits:
    d = agg[agg["eval.split"] == split]
    c = colors.get(split)
    for ax, metric in zip(axes, ("tv_target", "p_correct_exact")):
        ax.errorbar(
            d[K],
            d[f"policy.{metric}.mean"],
            yerr=d[f"policy.{metric}.se"].fillna(0),
            fmt="o-",
            ms=4,
            capsize=3,
            color=c,
            label=f"DISA, {names.get(split, split)}",
        )
        ax.axhline(
            d[f"ref.{metric}.mean"].iloc[0],
            ls="--",
            color=c,
            lw=1,
            label=f"π_ref, {names.get(split, split)}",
        )
    axes[1].axhline(
        d["policy.p_correct_target.mean"].iloc[0],
        ls=":",
        color=c,
        lw=1.5,
        label=f"p*, {names.get(split, split)}",
    )
axes[0].axhline(0, color="gray", lw=0.5)
for ax, title in zip(axes, ("exact TV to p* (0 = the target)", "exact P(correct)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (samples per training prompt)")
    ax.set_title(title, fontsize=10)
axes[0].legend(fontsize=7)
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(Path(SWEEP_DIR) / "k_convergence.png", dpi=120)
plt.show()

# %% [markdown]
# ## The numbers (mean ± s.e. over seeds)

# %%
agg.round(4)

# %% [markdown]
# ## Each K against π_ref, paired by seed and prompt
#
# The same paired bootstrap as the baselines table (`analysis.paired_differences`): the
# difference from π_ref per prompt, with a 95% CI over seeds × prompts; `*` where it excludes 0.

# %%
diffs = analysis.paired_comparisons(
    SWEEP_DIR,
    by=K,
    baselines=(analysis.REF_ARM,),
    metrics=("p_correct_exact", "tv_target", "tv_rewarded", "mean_at_k", "coverage"),
)
pd.concat(
    [analysis.paired_table(d).assign(split=split) for split, d in diffs.groupby("eval.split")],
    ignore_index=True,
)
