"""disa.analysis (loaders, seed statistics), the theory curves of disa.anchor.theory and
disa.studies against hand-built frames, brute-force enumeration and Monte Carlo."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from disa import analysis, studies
from disa import anchor as anchoring
from disa.anchor import theory


# -- seed aggregation ----------------------------------------------------------------------
def test_mean_se_by_hand():
    df = pd.DataFrame(
        {
            "algorithm": ["a", "a", "a", "b", "b", "c"],
            "m": [1.0, 2.0, 4.0, 10.0, 14.0, 5.0],
            "partial": [1.0, np.nan, 3.0, 2.0, 2.0, np.nan],
        }
    )
    agg = analysis.mean_se(df, ["algorithm"], ["m", "partial", "absent"]).set_index("algorithm")
    # a: mean 7/3, sd² = ((−4/3)² + (−1/3)² + (5/3)²)/2 = 7/3
    assert agg.loc["a", "m.mean"] == pytest.approx(7 / 3)
    assert agg.loc["a", "m.se"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert agg.loc["b", "m.mean"] == 12.0
    assert agg.loc["b", "m.se"] == pytest.approx(math.sqrt(8) / math.sqrt(2))
    assert math.isnan(agg.loc["c", "m.se"])  # one seed: no standard error
    # a missing value is missing, not zero: (1 + 3)/2 over the 2 runs that have it
    assert agg.loc["a", "partial.mean"] == 2.0
    assert agg.loc["a", "partial.se"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert "absent.mean" not in agg
    assert agg.n.to_dict() == {"a": 3, "b": 2, "c": 1}


def test_pass_at_k_curves_long_table():
    df = pd.DataFrame(
        {
            "algorithm": ["a", "a"],
            "ref.pass_at_1": [0.1, 0.3],
            "ref.pass_at_4": [0.5, 0.5],
            "policy.pass_at_1": [0.2, 0.4],
            "policy.pass_at_4": [0.6, 0.8],
        }
    )
    c = analysis.pass_at_k_curves(df).set_index(["model", "k"])
    assert c.loc[("policy", 4), "mean"] == pytest.approx(0.7)
    assert c.loc[("policy", 4), "se"] == pytest.approx(np.std([0.6, 0.8], ddof=1) / math.sqrt(2))
    assert c.loc[("ref", 1), "mean"] == pytest.approx(0.2)
    assert sorted(c.index.get_level_values("k").unique()) == [1, 4]


# -- loading run directories ---------------------------------------------------------------
def _fake_run(path, beta, seed, prompts=("p0", "p1")):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(
        json.dumps(
            {
                "algorithm": "disa",
                "beta": beta,
                "seed": seed,
                "proposal.strength": 0.5,
                "policy.mean_at_k": beta / 10,
            }
        )
    )
    pd.DataFrame(
        {"prompt_id": list(prompts), "log_z_hat": [0.1 * beta, 0.2], "beta": beta}
    ).to_parquet(path / "anchor.parquet")
    (path / "csv" / "version_0").mkdir(parents=True)
    pd.DataFrame({"step": [0, 1], "train/loss": [1.0, 0.5]}).to_csv(
        path / "csv" / "version_0" / "metrics.csv", index=False
    )
    # W&B's own copy of a run file must never be read as a run's table
    (path / "wandb" / "files").mkdir(parents=True)
    (path / "wandb" / "files" / "anchor.parquet").write_bytes(b"not parquet")


def test_load_anchors_tags_rows_with_run_config(tmp_path):
    _fake_run(tmp_path / "0", beta=1.0, seed=0)
    _fake_run(tmp_path / "1", beta=4.0, seed=1, prompts=("p0", "p1"))
    anchors = analysis.load_anchors(tmp_path)
    assert len(anchors) == 4
    assert set(anchors.seed) == {0, 1} and set(anchors.algorithm) == {"disa"}
    assert anchors.groupby("run_dir").beta.nunique().eq(1).all()
    assert anchors[anchors.seed == 1].log_z_hat.tolist() == [0.4, 0.2]
    curves = analysis.load_training_curves(tmp_path)
    assert len(curves) == 4 and set(curves.run_dir) == {str(tmp_path / "0"), str(tmp_path / "1")}
    assert analysis.varying(analysis.load_sweep(tmp_path)) == ["beta", "seed"]
    with pytest.raises(FileNotFoundError, match="bias_variance.parquet"):
        analysis.load_bias_variance(tmp_path)


def test_latest_run_and_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "multirun" / "d" / "a_sensitivity_beta", tmp_path / "multirun" / "d" / "b"
    for i, d in enumerate((old, new)):
        d.mkdir(parents=True)
        (d / "multirun.yaml").write_text("task: [experiment=baselines]" if d == new else "task: []")
        (d / "0").mkdir()
        (d / "0" / "summary.json").write_text("{}")
        t = time.time() - 100 + 10 * i
        os.utime(d / "multirun.yaml", (t, t))
        os.utime(d / "0" / "summary.json", (t, t))
    assert analysis.latest_sweep() == new
    assert analysis.latest_sweep("sensitivity_beta") == old
    assert analysis.latest_sweep("baselines") == new  # found through its overrides
    assert analysis.latest_run() == new / "0"
    with pytest.raises(FileNotFoundError, match="DISA_SWEEP_DIR"):
        analysis.latest_run("bias_variance_agg.parquet")
    monkeypatch.setenv("DISA_SWEEP_DIR", f"/x{os.pathsep}/y")
    assert analysis.sweep_dirs_from_env() == [Path("/x"), Path("/y")]


def test_load_wandb_reads_summaries_through_the_api():
    runs = [
        SimpleNamespace(
            id=f"r{i}",
            name=f"g/{i}",
            group="g",
            job_type="all",
            state="finished",
            summary={
                "beta": b,
                "policy.mean_at_k": m,
                "_step": 3,
                "eval_samples": {"_type": "table"},
            },
        )
        for i, (b, m) in enumerate([(1.0, 0.2), (2.0, 0.3)])
    ]
    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return runs

    df = analysis.load_wandb("disa", entity="me", group="g", api=FakeApi())
    assert calls == [("me/disa", {"group": "g"})]
    assert df["policy.mean_at_k"].tolist() == [0.2, 0.3]
    assert "_step" not in df and "eval_samples" not in df  # W&B internals and media are left out
    assert df["wandb.group"].eq("g").all()


# -- theory ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("P", "beta"), [(0.0, 2.0), (0.05, 1.0), (0.3, 4.0), (1.0, 8.0), (0.12, 2.0)]
)
def test_binary_ess_frac_by_enumeration(P, beta):
    # weights e^{βr}: E w and E w² by enumerating r ∈ {0, 1}
    ew = (1 - P) + P * math.exp(beta)
    ew2 = (1 - P) + P * math.exp(2 * beta)
    assert theory.binary_ess_frac(P, beta) == pytest.approx(ew**2 / ew2, rel=1e-12)
    # its minimum over P is 4e^β/(e^β + 1)², at P = 1/(e^β + 1)
    p_star = 1 / (math.exp(beta) + 1)
    lowest = 4 * math.exp(beta) / (math.exp(beta) + 1) ** 2
    assert theory.binary_ess_frac(p_star, beta) == pytest.approx(lowest, rel=1e-12)
    grid = np.concatenate([np.linspace(0, 1, 2001), np.geomspace(1e-8, 1, 2001)])
    assert theory.binary_ess_frac(grid, beta).min() >= lowest * (1 - 1e-12)


def test_binary_mc_moments_by_enumerating_every_outcome():
    K, P, beta = 6, 0.2, 2.0
    mean = second = 0.0
    for rs in itertools.product([0, 1], repeat=K):
        prob = math.prod(P if r else 1 - P for r in rs)
        v = anchoring.log_z_hat(beta * np.array(rs, float))
        mean += prob * v
        second += prob * v * v
    bias, var = theory.binary_mc_moments(K, P, beta)
    assert bias == pytest.approx(mean - math.log1p(P * math.expm1(beta)), abs=1e-12)
    assert var == pytest.approx(second - mean**2, abs=1e-12)


def test_delta_method_against_monte_carlo():
    """At large K the delta method matches the exact moments and a simulation; at small K
    (few rewarded samples expected) it overstates the bias, the exact sum does not."""
    rng = np.random.default_rng(0)
    P, beta, K, reps = 0.2, 2.0, 256, 4000
    frac = theory.binary_ess_frac(P, beta)
    r = rng.random((reps, K)) < P
    sims = np.array([anchoring.log_z_hat(beta * row) for row in r.astype(float)])
    log_z = math.log1p(P * math.expm1(beta))
    assert sims.var() == pytest.approx(float(theory.predicted_var(K, frac)), rel=0.1)
    assert sims.mean() - log_z == pytest.approx(
        float(theory.predicted_bias(K, frac)), abs=3 * sims.std() / math.sqrt(reps)
    )
    bias, var = theory.binary_mc_moments(K, P, beta)
    assert var == pytest.approx(float(theory.predicted_var(K, frac)), rel=0.05)
    assert bias == pytest.approx(float(theory.predicted_bias(K, frac)), rel=0.1)
    # the Kish ESS of a sample converges to the population fraction
    w = np.exp(beta * r[:64].ravel())
    assert (w.sum() ** 2 / (w**2).sum()) / w.size == pytest.approx(frac, rel=0.05)
    # small K: the delta method's bias is far below the exact one
    bias4, _ = theory.binary_mc_moments(4, 0.02, 4.0)
    assert theory.predicted_bias(4, theory.binary_ess_frac(0.02, 4.0)) < 3 * bias4 < 0
    assert theory.predicted_mse(K, frac) == pytest.approx(
        theory.predicted_bias(K, frac) ** 2 + theory.predicted_var(K, frac)
    )


# -- the bias-variance study on a discrete world ----------------------------------------------
REWARD = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
P_REF = np.array([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
Q_PROP = np.array([0.05, 0.40, 0.05, 0.35, 0.10, 0.05])


def _scores(k_max: int, prompts=("a", "b"), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for pid in prompts:
        for comp, dist in (("ref", P_REF), ("proposal", Q_PROP)):
            for j, o in enumerate(rng.choice(len(dist), size=k_max, p=dist)):
                rows.append(
                    {
                        "prompt_id": pid,
                        "component": comp,
                        "sample_idx": j,
                        "reward": REWARD[o],
                        "logp_ref": math.log(P_REF[o]),
                        "logq_ref": math.log(P_REF[o]),
                        "logq_proposal": math.log(Q_PROP[o]),
                        "text": str(o),
                    }
                )
    return pd.DataFrame(rows)


LOG_P_CORRECT = pd.Series(math.log(P_REF[REWARD > 0].sum()), index=["a", "b"])


def test_replicate_blocks_are_disjoint_and_stratified():
    scores = _scores(16)
    rows, lam, n_rep = studies.replicate_blocks(scores, 8, 0.25, max_replicates=None)
    assert (lam, n_rep) == (0.25, 2)  # split_counts(8, 0.25) = (6, 2), 16 // 8 blocks
    for (_pid, rep), g in rows.groupby(["prompt_id", "replicate"]):
        ref = g[g.component == "ref"].sample_idx
        prop = g[g.component == "proposal"].sample_idx
        assert ref.tolist() == list(range(8 * rep, 8 * rep + 6))
        assert prop.tolist() == list(range(8 * rep, 8 * rep + 2))
    assert len(rows) == 2 * 2 * 8
    assert studies.replicate_blocks(scores, 8, 0.25, max_replicates=1)[2] == 1
    assert studies.replicate_blocks(scores, 32, 0.0)[2] == 0
    with pytest.raises(ValueError, match="proposal"):
        studies.replicate_blocks(scores[scores.component == "ref"], 8, 0.5)


def test_bias_variance_table_reuses_the_anchor_estimator():
    scores = _scores(16)
    table, skipped = studies.bias_variance_table(
        scores, LOG_P_CORRECT, K=[4, 8, 32], beta=[1.5], strength=[0.0, 0.5]
    )
    assert skipped == [(32, 0.0), (32, 0.5)]
    assert len(table) == 2 * (4 + 2) * 2  # prompts × replicates of K=4 and K=8 × λ
    # one replicate recomputed from the anchor's own builder on exactly its samples
    row = table[
        (table.K == 8) & (table.strength == 0.5) & (table.replicate == 1) & (table.prompt_id == "b")
    ].iloc[0]
    block = scores[
        (scores.prompt_id == "b") & (scores.sample_idx >= 8) & (scores.sample_idx < 12)
    ].copy()
    block["sample_idx"] -= 8
    a = anchoring.build_anchor(block, beta=1.5, K=8, strength=0.5, log_p_correct=LOG_P_CORRECT)
    assert row.log_z_hat == pytest.approx(a.log_z_hat.iloc[0], abs=1e-12)
    assert row.se == pytest.approx(a.se.iloc[0]) and row.bias_delta == pytest.approx(a.bias.iloc[0])
    assert row.log_z == pytest.approx(a.log_z.iloc[0]) and row.error == pytest.approx(
        a.error.iloc[0]
    )
    assert table[table.strength == 0.0].exact_var.notna().all()
    assert table[table.strength == 0.5].exact_var.isna().all()
    agg = studies.summarize_bias_variance(table)
    assert len(agg) == 4 and agg.replicates.tolist() == [4, 4, 2, 2]
    with pytest.raises(ValueError, match="proposal.num_samples"):
        studies.bias_variance_table(scores, LOG_P_CORRECT, K=[64], beta=[1.0], strength=[0.0])


def test_bias_variance_follows_the_exact_stratified_variance():
    """With many replicates the study's empirical variance matches the exact variance of the
    stratified estimator, its population ESS fractions match their exact values, and its
    coverage is near 95% where the ESS is large."""
    beta, lam, K = 1.5, 0.5, 16
    scores = _scores(16 * 400, prompts=("a",), seed=1)
    table, _ = studies.bias_variance_table(
        scores, LOG_P_CORRECT.iloc[:1], K=[K], beta=[beta], strength=[lam]
    )
    agg = studies.summarize_bias_variance(table).iloc[0]
    mu = (1 - lam) * P_REF + lam * Q_PROP
    w = P_REF * np.exp(beta * REWARD) / mu
    Z = float(P_REF @ np.exp(beta * REWARD))
    var_c = [(d @ (w / Z) ** 2) - (d @ (w / Z)) ** 2 for d in (P_REF, Q_PROP)]
    rel_strat = (1 - lam) * var_c[0] + lam * var_c[1]
    assert agg.ess_frac_strat == pytest.approx(1 / (1 + rel_strat), rel=0.03)
    assert agg.ess_frac_pop == pytest.approx(1 / float(mu @ (w / Z) ** 2), rel=0.03)
    assert agg["var"] == pytest.approx(rel_strat / K, rel=0.2)
    assert agg.pred_var == pytest.approx(rel_strat / K, rel=0.05)
    assert agg.pred_var_iid >= agg.pred_var  # stratification removes the between-component variance
    assert abs(agg.bias - agg.pred_bias) < 3 * agg.bias_se
    assert 0.85 < agg.coverage <= 1.0
