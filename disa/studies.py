"""Studies that reuse one rollout cache: many estimates from disjoint blocks of cached samples.

The functions here are pure (tables in, tables out). A study runs inside a job
(``study.name`` in the config) as the study stage after the anchor (:mod:`disa.stages.study`),
which reads the scored rollouts, writes these tables into the run directory and returns flat
``study.*`` entries for ``summary.json``; with ``study.stop`` (the default) the job ends
there, without training or evaluation.

``bias_variance`` (``python run.py experiment=anchor_bias_variance``) measures the IS
estimator against the exact ``log Z`` over a grid K × β × λ, with no training. The rollouts
hold ``K_max`` samples per prompt from each mixture component (``proposal.num_samples``),
sampled and scored once. Replicate ``r`` of sample size K uses, from each component c, the
samples with ``sample_idx ∈ [r·K, r·K + K_c)``, ``(K_ref, K_prop) = split_counts(K, λ)``:

- the blocks of one (K, λ) are disjoint, so its replicates are independent draws of the
  stratified mixture estimator that the anchor stage computes;
- replicate r of a component is the same block for every β and λ (common random numbers),
  so the curves against β and λ are smoother than each point's own noise.

Per replicate: ``log_z_hat``, the anchor's diagnostics (ESS, the delta-method ``se`` and
``bias_delta``) and the error against the exact ``log_z``. Per (prompt, β, λ), the
population quantities from all K_max samples of each component, against which the
delta-method curves of :mod:`disa.anchor.theory` are drawn:

- ``ess_frac_pop`` = Z²/E_μ[w²], the large-K limit of Kish's ESS/K (what the anchor's
  ``se`` estimates: the variance of i.i.d. draws from μ_λ);
- ``ess_frac_strat`` = 1/(1 + Σ_c λ_c Var_c(w)/Z²), the same for the stratified design
  actually sampled (no between-component variance; equal to ``ess_frac_pop`` at λ ∈ {0, 1}).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from disa import anchor as anchoring
from disa.anchor import theory


def _available(scores: pd.DataFrame) -> dict[str, int]:
    """Samples per prompt from each component (the fewest over prompts)."""
    return scores.groupby(["component", "prompt_id"]).size().groupby(level=0).min().to_dict()


def replicate_blocks(
    scores: pd.DataFrame, K: int, strength: float, max_replicates: int | None = None
) -> tuple[pd.DataFrame, float, int]:
    """The samples of every replicate of sample size K at strength λ.

    Returns ``(rows, λ_eff, R)``: ``rows`` has a ``replicate`` column in ``0..R−1`` and is
    sorted by ``prompt_id, replicate, component, sample_idx``, so each consecutive run of
    K rows is one replicate of one prompt. R is the number of disjoint blocks of K samples
    the cache holds (at most ``max_replicates``); it is 0 when K exceeds the cache.
    """
    k_ref, k_prop = anchoring.split_counts(K, strength)
    avail = _available(scores)
    need = {c: k for c, k in (("ref", k_ref), ("proposal", k_prop)) if k > 0}
    missing = [c for c in need if c not in avail]
    if missing:
        raise ValueError(
            f"strength λ={strength} needs samples from the {missing} component(s), which the "
            f"rollout cache lacks (it has {sorted(avail)}); use proposal=mixture, or λ=0 only"
        )
    R = min(avail[c] // K for c in need)
    if max_replicates is not None:
        R = min(R, int(max_replicates))
    in_block = scores.sample_idx % K
    keep = scores.sample_idx < R * K
    keep &= ((scores.component == "ref") & (in_block < k_ref)) | (
        (scores.component == "proposal") & (in_block < k_prop)
    )
    rows = scores[keep].assign(replicate=lambda d: d.sample_idx // K)
    rows = rows.sort_values(["prompt_id", "replicate", "component", "sample_idx"], kind="stable")
    return rows.reset_index(drop=True), k_prop / K, R


def _log_mu(rows: pd.DataFrame, lam: float) -> np.ndarray:
    return anchoring.mixture_log_density(
        rows.logq_ref, rows.logq_proposal if lam > 0 else None, lam
    )


def population_ess(scores: pd.DataFrame, beta: float, lam: float, log_z: pd.Series) -> pd.DataFrame:
    """Per prompt, ``ess_frac_pop`` and ``ess_frac_strat`` (module docstring) at β and λ_eff
    ``lam``, estimated from every cached sample of each component; ``log_z`` indexed by
    prompt id."""
    comps = [c for c, f in (("ref", 1.0 - lam), ("proposal", lam)) if f > 0]
    rows = scores[scores.component.isin(comps)]
    log_w = anchoring.log_weights(rows.reward, rows.logp_ref, _log_mu(rows, lam), beta)
    w = np.exp(log_w - log_z.reindex(rows.prompt_id).to_numpy())  # w/Z
    g = pd.DataFrame(
        {
            "prompt_id": rows.prompt_id.to_numpy(),
            "component": rows.component.to_numpy(),
            "w": w,
            "w2": w**2,
        }
    ).groupby(["prompt_id", "component"])
    mom = pd.DataFrame({"m2": g.w2.mean(), "var": g.w.var(ddof=1)}).reset_index()
    mom["frac"] = mom.component.map({"ref": 1.0 - lam, "proposal": lam})
    per = (
        mom.assign(m2=mom.m2 * mom.frac, var=mom["var"] * mom.frac)
        .groupby("prompt_id")[["m2", "var"]]
        .sum()
    )
    return pd.DataFrame({"ess_frac_pop": 1.0 / per.m2, "ess_frac_strat": 1.0 / (1.0 + per["var"])})


def bias_variance_table(
    scores: pd.DataFrame,
    log_p_correct: pd.Series,
    *,
    K: Sequence[int],
    beta: Sequence[float],
    strength: Sequence[float],
    max_replicates: int | None = None,
    min_replicates: int = 2,
) -> tuple[pd.DataFrame, list[tuple[int, float]]]:
    """One row per prompt × K × β × λ × replicate, and the (K, λ) settings skipped.

    ``scores``: the score stage's table (K_max samples per prompt and component);
    ``log_p_correct``: exact ``log P_ref(correct|q)`` indexed by prompt id. A (K, λ) with
    fewer than ``min_replicates`` disjoint blocks in the cache is skipped (and listed).

    Columns: ``prompt_id, K, beta, strength, strength_effective, replicate, log_z_hat,
    log_z, error (= log_z_hat − log_z), ess, ess_frac, max_weight, se, bias_delta,
    covered (|error| ≤ 2 se), n_rewarded, ess_frac_pop, ess_frac_strat, pred_bias,
    pred_var, pred_var_iid`` and, for plain Monte Carlo (λ = 0 with μ = π_ref and a binary
    reward), the exact ``exact_bias, exact_var`` (NaN otherwise).
    """
    scores = scores[[c for c in anchoring.SCORE_COLUMNS if c in scores]]
    binary_ref = bool(
        scores.reward.isin([0, 1]).all() and np.allclose(scores.logq_ref, scores.logp_ref)
    )
    frames, skipped, pop_cache, exact_cache = [], [], {}, {}
    for lam in strength:
        for k in K:
            rows, lam_eff, n_rep = replicate_blocks(scores, int(k), float(lam), max_replicates)
            if n_rep < min_replicates:
                skipped.append((int(k), float(lam)))
                continue
            log_mu = _log_mu(rows, lam_eff)
            anchoring.check_finite(rows.assign(log_mu=log_mu), ["reward", "logp_ref", "log_mu"])
            pids = rows.prompt_id.to_numpy().reshape(-1, k)[:, 0]
            reps = rows.replicate.to_numpy().reshape(-1, k)[:, 0]
            n_rewarded = (rows.reward.to_numpy() > 0).reshape(-1, k).sum(axis=1)
            for b in beta:
                b = float(b)
                log_w = anchoring.log_weights(rows.reward, rows.logp_ref, log_mu, b).reshape(-1, k)
                diag = pd.DataFrame([anchoring.is_diagnostics(lw) for lw in log_w])
                log_z = pd.Series(
                    theory.exact_log_z(log_p_correct.to_numpy(), b), index=log_p_correct.index
                )
                if (b, lam_eff) not in pop_cache:
                    pop = population_ess(scores, b, lam_eff, log_z)
                    if lam_eff == 0 and binary_ref:  # exact, where the rewarded set gives P
                        p = theory.p_correct_from_log_z(log_z.reindex(pop.index).to_numpy(), b)
                        exact_frac = theory.binary_ess_frac(p, b)
                        pop = pop.assign(ess_frac_pop=exact_frac, ess_frac_strat=exact_frac)
                    pop_cache[b, lam_eff] = pop
                pop = pop_cache[b, lam_eff].reindex(pids)
                part = pd.DataFrame(
                    {
                        "prompt_id": pids,
                        "K": int(k),
                        "beta": b,
                        "strength": float(lam),
                        "strength_effective": lam_eff,
                        "replicate": reps,
                        "log_z_hat": [anchoring.log_z_hat(lw) for lw in log_w],
                        "log_z": log_z.reindex(pids).to_numpy(),
                    }
                )
                part["error"] = part.log_z_hat - part.log_z
                part[["ess", "ess_frac", "max_weight", "se", "bias_delta"]] = diag[
                    ["ess", "ess_frac", "max_weight", "se", "bias"]
                ].to_numpy()
                part["covered"] = part.error.abs() <= 2 * part.se
                part["n_rewarded"] = n_rewarded
                part["ess_frac_pop"] = pop.ess_frac_pop.to_numpy()
                part["ess_frac_strat"] = pop.ess_frac_strat.to_numpy()
                part["pred_bias"] = theory.predicted_bias(k, part.ess_frac_strat)
                part["pred_var"] = theory.predicted_var(k, part.ess_frac_strat)
                part["pred_var_iid"] = theory.predicted_var(k, part.ess_frac_pop)
                exact = (np.nan, np.nan)
                if lam_eff == 0 and binary_ref:
                    for pid in np.unique(pids):
                        if (pid, k, b) not in exact_cache:
                            p = float(theory.p_correct_from_log_z(log_z[pid], b))
                            exact_cache[pid, k, b] = theory.binary_mc_moments(int(k), p, b)
                    exact = np.array([exact_cache[pid, k, b] for pid in pids]).T
                part["exact_bias"], part["exact_var"] = exact[0], exact[1]
                frames.append(part)
    if not frames:
        raise ValueError(
            f"no (K, λ) setting has {min_replicates} disjoint replicates in the rollout cache "
            f"(samples per prompt and component: {_available(scores)}); lower study.K or raise "
            "proposal.num_samples"
        )
    return pd.concat(frames, ignore_index=True), skipped


def summarize_bias_variance(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (K, β, λ): empirical against predicted bias, variance and MSE of log Ẑ.

    - ``bias`` (± ``bias_se``): mean of ``log Ẑ − log Z`` over prompts and replicates;
    - ``var``: the across-replicate variance of log Ẑ of each prompt, averaged over prompts;
    - ``mse``: mean squared error; ``coverage``: share of replicates with |error| ≤ 2 se;
    - ``pred_bias, pred_var, pred_mse``: delta method at the population ESS of the
      stratified design; ``pred_var_iid``: the same for i.i.d. draws from μ_λ;
    - ``plugin_bias, plugin_var``: the anchor's own per-replicate estimates (``bias_delta``,
      ``se²``) averaged; ``exact_bias, exact_var``: exact plain-MC values (λ = 0);
    - ``ess_frac``: mean sample ESS/K; ``no_reward``: share of replicates without a
      rewarded sample (where the sample ESS says nothing about the missing tail).
    """
    keys = ["K", "beta", "strength", "strength_effective"]
    t = table.assign(
        sq_error=table.error**2,
        se2=table.se**2,
        pred_mse=table.pred_bias**2 + table.pred_var,
        no_reward=table.n_rewarded == 0,
    )
    g = t.groupby(keys, sort=True)
    out = g.agg(
        prompts=("prompt_id", "nunique"),
        replicates=("replicate", "nunique"),
        mean_log_z=("log_z", "mean"),
        bias=("error", "mean"),
        mse=("sq_error", "mean"),
        coverage=("covered", "mean"),
        pred_bias=("pred_bias", "mean"),
        pred_var=("pred_var", "mean"),
        pred_mse=("pred_mse", "mean"),
        pred_var_iid=("pred_var_iid", "mean"),
        plugin_bias=("bias_delta", "mean"),
        plugin_var=("se2", "mean"),
        exact_bias=("exact_bias", "mean"),
        exact_var=("exact_var", "mean"),
        ess_frac=("ess_frac", "mean"),
        ess_frac_pop=("ess_frac_pop", "mean"),
        ess_frac_strat=("ess_frac_strat", "mean"),
        no_reward=("no_reward", "mean"),
    )
    out["bias_se"] = g.error.std(ddof=1) / np.sqrt(g.size())
    # variance within each prompt (across its replicates), then averaged over prompts
    out["var"] = t.groupby([*keys, "prompt_id"]).log_z_hat.var(ddof=1).groupby(level=keys).mean()
    order = [
        "prompts",
        "replicates",
        "mean_log_z",
        "bias",
        "bias_se",
        "pred_bias",
        "plugin_bias",
        "exact_bias",
        "var",
        "pred_var",
        "pred_var_iid",
        "plugin_var",
        "exact_var",
        "mse",
        "pred_mse",
        "coverage",
        "ess_frac",
        "ess_frac_pop",
        "ess_frac_strat",
        "no_reward",
    ]
    return out[order].reset_index()


def describe_skipped(skipped: list[tuple[int, float]]) -> str:
    """``"λ=0: K=256; λ=0.5: K=128,256"``."""
    by_lam: dict[float, list[int]] = {}
    for k, lam in skipped:
        by_lam.setdefault(lam, []).append(k)
    return "; ".join(f"λ={lam:g}: K=" + ",".join(map(str, ks)) for lam, ks in by_lam.items())
