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
# # Bias and variance of the anchor's log Ẑ
#
# Reads a run of `python run.py experiment=anchor_bias_variance`: for every prompt, sample
# size K, inverse temperature β and proposal strength λ, many independent replicates of
# `log Ẑ` computed from disjoint blocks of one rollout cache, each against the exact `log Z`.
#
# Empirical (markers): bias, variance and MSE of `log Ẑ − log Z`, and the coverage of
# `log Ẑ ± 2 se` (the anchor's own delta-method s.e.). Predicted (dashed): the delta method
# at the population ESS, `bias ≈ −(1/ess − 1)/(2K)`, `var ≈ (1/ess − 1)/K`
# (`disa.anchor.theory.predicted_bias`, `predicted_var`). For plain Monte Carlo (λ = 0) and a
# binary reward, the exact finite-K values are dotted (`disa.anchor.theory.binary_mc_moments`).
#
# Run directory: `$DISA_SWEEP_DIR`, else the newest run holding `bias_variance_agg.parquet`
# under `outputs/` or `multirun/`. The figures are saved there as PNG.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from disa import analysis

# %% tags=["parameters"]
RUN_DIR = str(
    (analysis.sweep_dirs_from_env() or [analysis.latest_run("bias_variance_agg.parquet")])[0]
)
K_FIXED = 32  # K of the "against β" and "against λ" figures (the nearest K in the study)

# %%
table, agg = analysis.load_bias_variance(RUN_DIR)
out = Path(RUN_DIR)
betas = sorted(agg.beta.unique())
lams = sorted(agg.strength.unique())
K_FIXED = min(agg.K.unique(), key=lambda k: abs(np.log(k) - np.log(K_FIXED)))
colors = dict(zip(lams, plt.cm.viridis(np.linspace(0, 0.9, len(lams)))))
print(
    f"{RUN_DIR}: {len(table)} estimates, {len(agg)} settings, "
    f"K ∈ {sorted(agg.K.unique())}, β ∈ {betas}, λ ∈ {lams}"
)


# %%
def save(fig, name):
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print("saved", path)


ROWS = [
    ("bias", "−bias of log Ẑ"),
    ("var", "variance of log Ẑ"),
    ("mse", "MSE of log Ẑ"),
    ("coverage", "coverage of ±2 s.e."),
]


def negative(x):
    """−x where x < 0 (the bias of log Ẑ is ≤ 0 in expectation); a positive empirical bias
    (noise) is left out of the log-scale plot."""
    return np.where(x < 0, -x, np.nan)


def draw(ax, d, x, what, color, label):
    d = d.sort_values(x)
    if what == "bias":
        ax.plot(d[x], negative(d.bias), "o-", ms=3, color=color, label=label)
        ax.plot(d[x], negative(d.pred_bias), "--", color=color)
        ax.plot(d[x], negative(d.exact_bias), ":", color=color, lw=2)
        ax.set_yscale("log")
    elif what in ("var", "mse"):
        ax.plot(d[x], d[what], "o-", ms=3, color=color, label=label)
        ax.plot(d[x], d[f"pred_{what}"], "--", color=color)
        if what == "var":
            ax.plot(d[x], d.exact_var, ":", color=color, lw=2)
        ax.set_yscale("log")
    else:
        ax.plot(d[x], d.coverage, "o-", ms=3, color=color, label=label)
        ax.axhline(0.954, color="gray", lw=0.8)
        ax.set_ylim(0, 1.02)


# %% [markdown]
# ## Against K (one column per β, one colour per λ)

# %%
fig, axes = plt.subplots(
    len(ROWS), len(betas), figsize=(3.6 * len(betas), 2.8 * len(ROWS)), sharex=True, squeeze=False
)
for j, b in enumerate(betas):
    for i, (what, label) in enumerate(ROWS):
        ax = axes[i, j]
        for lam in lams:
            draw(
                ax,
                agg[(agg.beta == b) & (agg.strength == lam)],
                "K",
                what,
                colors[lam],
                f"λ={lam:g}",
            )
        ax.set_xscale("log", base=2)
        if j == 0:
            ax.set_ylabel(label)
        if i == 0:
            ax.set_title(f"β = {b:g}")
        if i == len(ROWS) - 1:
            ax.set_xlabel("K")
axes[0, -1].legend(
    fontsize=7, title="markers: empirical\n-- delta method, ·· exact (λ=0)", title_fontsize=7
)
fig.tight_layout()
save(fig, "bias_variance_vs_K.png")
plt.show()

# %% [markdown]
# ## Against β and against λ at fixed K

# %%
fig, axes = plt.subplots(len(ROWS), 2, figsize=(9, 2.8 * len(ROWS)), squeeze=False)
at_k = agg[agg.K == K_FIXED]
beta_colors = dict(zip(betas, plt.cm.plasma(np.linspace(0, 0.85, len(betas)))))
for i, (what, label) in enumerate(ROWS):
    for lam in lams:
        draw(axes[i, 0], at_k[at_k.strength == lam], "beta", what, colors[lam], f"λ={lam:g}")
    for b in betas:
        draw(axes[i, 1], at_k[at_k.beta == b], "strength", what, beta_colors[b], f"β={b:g}")
    axes[i, 0].set_ylabel(label)
axes[-1, 0].set_xlabel("β")
axes[-1, 1].set_xlabel("λ (proposal strength)")
axes[0, 0].set_title(f"K = {K_FIXED}, against β")
axes[0, 1].set_title(f"K = {K_FIXED}, against λ")
axes[0, 0].legend(fontsize=7)
axes[0, 1].legend(fontsize=7)
fig.tight_layout()
save(fig, "bias_variance_vs_beta_lambda.png")
plt.show()

# %% [markdown]
# ## Where the delta method holds
#
# Empirical over predicted variance and bias against the expected effective sample size
# `K·ess` of each setting (ess: the population ESS/K of the stratified design). The delta
# method is a large-sample result: expect the ratios near 1 once `K·ess` is large (a bias
# ratio is only meaningful where the predicted bias exceeds twice the empirical bias's
# standard error: the others are crosses), and the plug-in s.e. (the anchor's own, from the
# sample ESS) to under-cover where most replicates see no rewarded sample (`no_reward`),
# because the sample ESS cannot see the missing tail.

# %%
agg["expected_ess"] = agg.K * agg.ess_frac_strat
# a bias below twice its own standard error is not measured by this many replicates
agg["bias_measured"] = agg.pred_bias.abs() > 2 * agg.bias_se
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for lam in lams:
    d = agg[agg.strength == lam]
    axes[0].scatter(
        d.expected_ess, d["var"] / d.pred_var, s=12, color=colors[lam], label=f"λ={lam:g}"
    )
    for measured, marker in ((True, "o"), (False, "x")):
        m = d[d.bias_measured == measured]
        axes[1].scatter(
            m.expected_ess, m.bias / m.pred_bias, s=12, marker=marker, color=colors[lam]
        )
    axes[2].scatter(d.no_reward, d.coverage, s=12, color=colors[lam])
axes[0].set_yscale("log")
axes[1].set_yscale("symlog", linthresh=0.1)
for ax, title in zip(
    axes[:2],
    ["variance: empirical / predicted", "bias: empirical / predicted (x: |pred| < 2 s.e.)"],
):
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("expected ESS = K · ess")
    ax.set_title(title, fontsize=10)
axes[2].axhline(0.954, color="gray", lw=0.8)
axes[2].set_xlabel("share of replicates without a rewarded sample")
axes[2].set_title("coverage of ±2 s.e.")
axes[0].legend(fontsize=7)
fig.tight_layout()
save(fig, "bias_variance_theory_fit.png")
plt.show()

# %% [markdown]
# ## The numbers at fixed K

# %%
cols = [
    "K",
    "beta",
    "strength",
    "mean_log_z",
    "bias",
    "pred_bias",
    "plugin_bias",
    "var",
    "pred_var",
    "plugin_var",
    "mse",
    "coverage",
    "ess_frac",
    "ess_frac_strat",
    "no_reward",
]
at_k[cols].round(4)
