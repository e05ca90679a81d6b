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
# # Baselines: DISA against FlowRL, GRPO, GSPO and LoRA-SFT
#
# Reads a sweep of `python run.py -m experiment=baselines seed=0,1,2` (any sweep works: rows
# are grouped by algorithm). Mean ± standard error over seeds of every metric, the unbiased
# pass@k curves of each trained policy against π_ref, and the training curves.
#
# Sweep directory: `$DISA_SWEEP_DIR`, else the newest multirun launched with
# `experiment=baselines` (or named after it). The figures are saved there as PNG.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Image, display

from disa import analysis

# %% tags=["parameters"]
SWEEP_DIR = str((analysis.sweep_dirs_from_env() or [analysis.latest_sweep("baselines")])[0])

# %%
out = Path(SWEEP_DIR)
runs = analysis.load_sweep(SWEEP_DIR)
print(f"{SWEEP_DIR}: {len(runs)} runs; varying: {analysis.varying(runs)}")

# %% [markdown]
# ## The comparison table (mean ± s.e. over seeds)

# %%
# comparison.{csv,md,png} and paired.csv, as the sweep's callback does
written = analysis.write_comparison(SWEEP_DIR)
analysis.comparison_table(runs)

# %%
display(Image(str(written["png"])))


# %%
def part_by(frame, columns):
    """(label, rows) for each combination of ``columns`` (one part when there are none)."""
    if not columns:
        return [("", frame)]
    return [
        (dict(zip(columns, k if isinstance(k, tuple) else (k,))), g)
        for k, g in frame.groupby(columns)
    ]


# %% [markdown]
# ## Paired differences, with a bootstrap CI over seeds × prompts
#
# Per held-out prompt and seed, each algorithm's metric minus DISA's (then minus π_ref's);
# the mean over the grid and its 95% CI from resampling seeds and prompts
# (`analysis.paired_differences`). `*` marks a difference whose CI excludes 0.

# %%
# None: the runs wrote no per-prompt metrics
diffs = analysis.paired_comparisons(SWEEP_DIR, by="algorithm")
settings = [c for c in ([] if diffs is None else diffs.columns) if c not in analysis.PAIRED_COLUMNS]
for key, part in [] if diffs is None else part_by(diffs, settings):
    for baseline, rows in part[part.arm != analysis.REF_ARM].groupby("baseline"):
        print(f"against {baseline} {key}:")
        display(analysis.paired_table(rows))

# %% [markdown]
# ## Is FlowRL's learned log Z_φ calibrated?
#
# On the embedded task the exact log Z(q) of every training prompt is known. FlowRL logs its
# head's log Z_φ(q) against it at every logging step (mean error, mean |error|, correlation
# across prompts); DISA's log Ẑ(q) is estimated once, before training, and frozen. FlowRL's
# objective (length-normalised log-ratios, β_f · group-normalised reward) has its own
# fixed point, so nothing ties log Z_φ to log Z at the run's β: the figure shows how far apart
# they are, which is the case for decoupling the anchor from the policy.

# %%
try:
    train_curves = analysis.load_training_curves(SWEEP_DIR)
except FileNotFoundError:
    train_curves = None
anchors = analysis.load_anchors(SWEEP_DIR) if runs.algorithm.eq("disa").any() else None
if train_curves is not None and anchors is not None and "train/log_z_phi_error" in train_curves:
    flowrl = train_curves[train_curves.algorithm == "flowrl"]
    path = analysis.plot_log_z_calibration(
        flowrl, anchors[anchors.algorithm == "disa"], out / "log_z_calibration.png"
    )
    display(Image(str(path)))
else:
    print("no FlowRL log Z_φ calibration or DISA anchor in this sweep")

# %% [markdown]
# ## pass@k against k
#
# Unbiased pass@k (Chen et al., 2021) from the k evaluation samples per held-out prompt;
# π_ref dashed. A policy that collapses onto few answers gains pass@1 but flattens out.

# %%
curves = analysis.pass_at_k_curves(runs)
fig, ax = plt.subplots(figsize=(5.5, 3.8))
for alg, d in curves[curves.model == "policy"].groupby("algorithm"):
    ax.errorbar(d.k, d["mean"], yerr=d.se.fillna(0), fmt="o-", ms=4, capsize=2, label=alg)
ref = curves[curves.model == "ref"].groupby("k")["mean"].mean()
ax.plot(ref.index, ref.to_numpy(), "k--", label="π_ref")
ax.set_xscale("log", base=2)
ax.set_xlabel("k")
ax.set_ylabel("pass@k")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "pass_at_k.png", dpi=110)
plt.show()

# %% [markdown]
# ## Training curves (CSV logger; mean over seeds)

# %%
try:
    curves = analysis.load_training_curves(SWEEP_DIR)
except FileNotFoundError:
    curves = None
    print("no metrics.csv in this sweep (logger=none?)")
if curves is not None and "train/loss" in curves:
    steps = curves.dropna(subset=["train/loss"])
    # online algorithms log once per rollout (the CSV's "step"); train/optimizer_steps counts updates
    x = "train/optimizer_steps" if "train/optimizer_steps" in steps else "step"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for alg, d in steps.groupby("algorithm"):
        mean = d.groupby(x)["train/loss"].mean()
        ax.plot(mean.index, mean.to_numpy(), label=alg)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each algorithm its own)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.show()

# %% [markdown]
# ## A few sample completions of each trained policy

# %%
samples = analysis.load_eval_samples(SWEEP_DIR)
samples.groupby("algorithm").head(6)[["algorithm", "seed", "prompt_id", "text", "reward"]]
