"""disa.anchor against independent float64 computations and exact enumeration."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from disa import anchor
from disa.anchor import theory

# -- a small discrete world: 6 outcomes, binary reward, a reference and a proposal ---------
REWARD = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
P_REF = np.array([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
Q_PROP = np.array([0.05, 0.40, 0.05, 0.35, 0.10, 0.05])
BETA = 1.5
Z_EXACT = float(sum(p * math.exp(BETA * r) for p, r in zip(P_REF, REWARD)))


def _naive_log_mean_exp(x) -> float:
    return math.log(sum(math.exp(v) for v in x) / len(x))


def _z_hat(idx, log_mu) -> float:
    """Ẑ for the outcome tuple ``idx`` with per-outcome log μ, through the code under test."""
    idx = list(idx)
    lw = anchor.log_weights(REWARD[idx], np.log(P_REF[idx]), np.asarray(log_mu)[idx], BETA)
    return math.exp(anchor.log_z_hat(lw))


# -- pure estimator functions ----------------------------------------------------------------
def test_log_weights_matches_explicit_loop():
    rng = np.random.default_rng(0)
    r, lp, lq = rng.integers(0, 2, 7).astype(float), rng.normal(size=7) * 5, rng.normal(size=7) * 5
    got = anchor.log_weights(r, lp, lq, 2.5)
    want = [2.5 * r[i] + lp[i] - lq[i] for i in range(7)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.dtype == np.float64


@pytest.mark.parametrize("K", [1, 2, 5, 64])
def test_log_z_hat_matches_naive(K):
    rng = np.random.default_rng(K)
    lw = rng.normal(size=K) * 3
    assert anchor.log_z_hat(lw) == pytest.approx(_naive_log_mean_exp(lw), abs=1e-12)


@pytest.mark.parametrize("shift", [1000.0, -1000.0, 745.0, -745.0])
def test_log_z_hat_stable_far_from_zero(shift):
    rng = np.random.default_rng(1)
    base = rng.normal(size=16) * 2
    with np.errstate(all="raise"):  # no overflow / underflow warnings either
        got = anchor.log_z_hat(base + shift)
    assert math.isfinite(got)
    assert got == pytest.approx(shift + _naive_log_mean_exp(base), abs=1e-9)


def test_log_z_hat_mixed_huge_range():
    # one weight e^1000, one e^-1000: log mean = 1000 - log 2 (the small one is negligible)
    assert anchor.log_z_hat(np.array([1000.0, -1000.0])) == pytest.approx(
        1000 - math.log(2), abs=1e-12
    )


def test_is_diagnostics_by_hand():
    w = [1.0, 2.0, 3.0, 4.0]  # Σw = 10, Σw² = 30, ESS = 100/30
    ess = 100 / 30
    excess = 4 / ess - 1  # = 0.2
    for shift in (0.0, 700.0, -700.0):  # scale-free
        d = anchor.is_diagnostics(np.log(w) + shift)
        assert d["K"] == 4
        assert d["ess"] == pytest.approx(ess, rel=1e-12)
        assert d["ess_frac"] == pytest.approx(ess / 4, rel=1e-12)
        assert d["max_weight"] == pytest.approx(0.4, rel=1e-12)
        assert d["bias"] == pytest.approx(-excess / 8, rel=1e-10)
        assert d["se"] == pytest.approx(math.sqrt(excess / 4), rel=1e-10)


def test_is_diagnostics_one_dominant_weight():
    d = anchor.is_diagnostics(np.array([0.0, -50.0, -50.0, -50.0, -50.0]))
    assert d["ess"] == pytest.approx(1.0, abs=1e-12)
    assert d["max_weight"] == pytest.approx(1.0, abs=1e-12)
    assert d["bias"] == pytest.approx(-(5 - 1) / 10, abs=1e-9)
    assert d["se"] == pytest.approx(math.sqrt(4 / 5), abs=1e-9)


def test_is_diagnostics_equal_weights_is_exactly_zero():
    d = anchor.is_diagnostics(np.full(7, 0.3))
    assert d["ess"] == pytest.approx(7.0)
    assert d["bias"] == 0.0 and d["se"] == 0.0


def test_is_diagnostics_is_the_delta_method_at_the_sample_ess():
    rng = np.random.default_rng(0)
    for K in (2, 5, 32, 257):
        for scale in (1e-9, 0.1, 1.0, 5.0):  # near-equal weights up to one dominant weight
            d = anchor.is_diagnostics(rng.normal(0.0, scale, K))
            assert d["bias"] == pytest.approx(
                float(theory.predicted_bias(K, d["ess_frac"])), rel=1e-12, abs=1e-300
            )
            assert d["se"] == pytest.approx(
                math.sqrt(theory.predicted_var(K, d["ess_frac"])), rel=1e-12
            )
            # and the explicit formulas of the docstring, with the rounding guard
            excess = max(K / d["ess"] - 1.0, 0.0)
            assert d["bias"] == pytest.approx(-excess / (2 * K), rel=1e-12, abs=1e-300)
            assert d["se"] == pytest.approx(math.sqrt(excess / K), rel=1e-12, abs=1e-300)
            assert d["bias"] <= 0.0 <= d["se"]


def test_mixture_log_density_by_hand():
    lr, lq = np.log([0.2, 0.01]), np.log([0.05, 0.5])
    got = anchor.mixture_log_density(lr, lq, 0.3)
    np.testing.assert_allclose(
        got, np.log([0.7 * 0.2 + 0.3 * 0.05, 0.7 * 0.01 + 0.3 * 0.5]), atol=1e-12
    )
    np.testing.assert_allclose(anchor.mixture_log_density(lr, None, 0.0), lr)
    np.testing.assert_allclose(anchor.mixture_log_density(lr, lq, 1.0), lq)
    # stable in log space far below exp's range
    got = anchor.mixture_log_density(np.array([-2000.0]), np.array([-2001.0]), 0.5)
    assert got[0] == pytest.approx(-2000 + math.log(0.5 + 0.5 * math.exp(-1)), abs=1e-9)


@pytest.mark.parametrize(
    ("K", "lam", "want"),
    [
        (8, 0.5, (4, 4)),
        (2, 0.5, (1, 1)),
        (4, 0.3, (3, 1)),
        (10, 0.0, (10, 0)),
        (10, 1.0, (0, 10)),
        (3, 0.9, (0, 3)),
    ],
)
def test_split_counts(K, lam, want):
    assert anchor.split_counts(K, lam) == want


# -- exact enumeration: unbiasedness and Jensen -------------------------------------------------
@pytest.mark.parametrize(("name", "mu"), [("ref", P_REF), ("proposal", Q_PROP)])
@pytest.mark.parametrize("K", [2, 3])
def test_estimator_unbiased_and_jensen_by_enumeration(name, mu, K):
    e_z, e_log_z, total = 0.0, 0.0, 0.0
    for idx in itertools.product(range(6), repeat=K):
        prob = math.prod(mu[i] for i in idx)
        z = _z_hat(idx, np.log(mu))
        total += prob
        e_z += prob * z
        e_log_z += prob * math.log(z)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert e_z == pytest.approx(Z_EXACT, rel=1e-12)  # E[Ẑ] = Z exactly
    assert e_log_z < math.log(Z_EXACT) - 1e-6  # E[log Ẑ] < log Z (strict: Ẑ is not constant)


def _stratified_expectation(K: int, lam: float, lam_density: float) -> float:
    """E[Ẑ] with K_ref samples from π_ref and K_prop from the proposal (stratified), the
    weights using the mixture density with weight ``lam_density``."""
    k_ref, k_prop = anchor.split_counts(K, lam)
    log_mu = anchor.mixture_log_density(np.log(P_REF), np.log(Q_PROP), lam_density)
    e_z = 0.0
    for idx in itertools.product(range(6), repeat=K):
        prob = math.prod(P_REF[i] for i in idx[:k_ref]) * math.prod(Q_PROP[i] for i in idx[k_ref:])
        e_z += prob * _z_hat(idx, log_mu)
    return e_z


def test_balance_heuristic_k2_half_is_exactly_unbiased():
    assert anchor.split_counts(2, 0.5) == (1, 1)
    assert _stratified_expectation(2, 0.5, 0.5) == pytest.approx(Z_EXACT, rel=1e-12)


@pytest.mark.parametrize(("K", "lam"), [(3, 0.5), (4, 0.3)])
def test_balance_heuristic_needs_effective_lambda(K, lam):
    k_ref, k_prop = anchor.split_counts(K, lam)
    lam_eff = k_prop / K
    assert lam_eff != lam
    assert _stratified_expectation(K, lam, lam_eff) == pytest.approx(Z_EXACT, rel=1e-12)
    # the nominal λ in the density is biased: the test can tell the two apart
    assert abs(_stratified_expectation(K, lam, lam) - Z_EXACT) > 1e-3


# -- exact log Z ------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0])
def test_exact_log_z_moderate(beta):
    P = np.array([0.01, 0.3, 0.5, 0.9])
    got = theory.exact_log_z(np.log(P), beta)
    want = [math.log((1 - p) + p * math.exp(beta)) for p in P]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0])
def test_exact_log_z_near_zero_and_one(beta):
    # P → 0: log Z = log1p(P (e^β − 1));  P → 1: log Z = β + log1p(−(1−P)(1 − e^{−β}))
    # absolute accuracy is what matters (log Ẑ − log Z is an absolute error)
    for lp in (math.log(1e-3), math.log(1e-8), -40.0, -200.0, -700.0):
        p = math.exp(lp)
        got = float(theory.exact_log_z(np.array([lp]), beta)[0])
        assert got == pytest.approx(math.log1p(p * math.expm1(beta)), rel=1e-6, abs=1e-15)
        assert got >= 0
    for one_minus_p in (1e-6, 1e-12):
        lp = math.log1p(-one_minus_p)
        got = float(theory.exact_log_z(np.array([lp]), beta)[0])
        want = beta + math.log1p(-one_minus_p * -math.expm1(-beta))
        assert got == pytest.approx(want, abs=1e-13)
    with np.errstate(divide="ignore"):  # P = 1 exactly: log(1 − P) = −inf is fine
        assert float(theory.exact_log_z(np.array([0.0]), beta)[0]) == pytest.approx(beta, abs=1e-15)
    assert float(theory.exact_log_z(np.array([-np.inf]), beta)[0]) == 0.0


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0, 50.0])
def test_exact_log_z_and_p_correct_are_inverse(beta):
    P = [0.0, 1e-300, 1e-12, 1e-3, 0.3, 0.5, 1 - 1e-9, 1.0]
    with np.errstate(divide="ignore"):
        log_z = theory.exact_log_z(np.log(P), beta)
    for p, lz in zip(P, log_z):
        want = math.log1p(p * math.expm1(beta))  # log(1 + P(e^β − 1)), plain float64
        assert lz == pytest.approx(want, rel=1e-12, abs=1e-300)
        assert lz == pytest.approx(math.log((1 - p) + p * math.exp(beta)), abs=1e-12 * beta)
    # P → log Z → P: relative accuracy for P → 0, absolute near 1
    back = theory.p_correct_from_log_z(log_z, beta)
    assert back.shape == (len(P),)
    np.testing.assert_allclose(back, P, rtol=1e-9, atol=1e-13)
    assert back[0] == 0.0 and back[-1] == 1.0
    # log Z → P → log Z over [0, β]
    grid = np.linspace(0.0, beta, 41)
    with np.errstate(divide="ignore"):
        again = theory.exact_log_z(np.log(theory.p_correct_from_log_z(grid, beta)), beta)
    np.testing.assert_allclose(again, grid, rtol=1e-12, atol=1e-13)
    # clipped to [0, 1] outside log Z ∈ [0, β]; scalars in, 0-d arrays out
    np.testing.assert_array_equal(theory.p_correct_from_log_z([-0.1, beta + 1.0], beta), [0.0, 1.0])
    assert float(theory.p_correct_from_log_z(0.0, beta)) == 0.0


# -- trajectory selection ---------------------------------------------------------------------
def _scores(prompts=("p0", "p1"), k_max=5, with_proposal=True, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for pid in prompts:
        for comp in ("ref", "proposal") if with_proposal else ("ref",):
            for j in range(k_max):
                row = {
                    "prompt_id": pid,
                    "component": comp,
                    "sample_idx": j,
                    "reward": float(rng.integers(0, 2)),
                    "logp_ref": -rng.uniform(1, 6),
                    "logq_ref": -rng.uniform(1, 6),
                }
                if with_proposal:
                    row["logq_proposal"] = -rng.uniform(1, 6)
                rows.append(row)
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)  # order must not matter


@pytest.mark.parametrize(("K", "lam"), [(4, 0.5), (5, 0.3), (5, 0.0), (4, 1.0), (8, 0.6)])
def test_select_trajectories_counts(K, lam):
    df = _scores()
    traj, lam_eff = anchor.select_trajectories(df, K, lam)
    k_prop = int(round(lam * K))
    assert lam_eff == k_prop / K
    for pid in ("p0", "p1"):
        g = traj[traj.prompt_id == pid]
        assert sorted(g[g.component == "proposal"].sample_idx) == list(range(k_prop))
        assert sorted(g[g.component == "ref"].sample_idx) == list(range(K - k_prop))


@pytest.mark.parametrize(
    ("K", "lam", "comp"), [(12, 0.5, "ref"), (8, 0.9, "proposal"), (6, 0.0, "ref")]
)
def test_select_trajectories_too_few_samples(K, lam, comp):
    with pytest.raises(ValueError, match="proposal.num_samples") as e:
        anchor.select_trajectories(_scores(), K, lam)
    assert comp in str(e.value)


def test_select_trajectories_missing_component():
    with pytest.raises(ValueError, match="proposal.num_samples"):
        anchor.select_trajectories(_scores(with_proposal=False), 4, 0.5)


# -- build_anchor end to end ------------------------------------------------------------------
def _hand_rows(pid, ref, prop):
    """ref/prop: lists of (reward, logp_ref, logq_ref, logq_proposal)."""
    rows = []
    for comp, items in (("ref", ref), ("proposal", prop)):
        for j, (r, lp, lqr, lqp) in enumerate(items):
            rows.append(
                {
                    "prompt_id": pid,
                    "component": comp,
                    "sample_idx": j,
                    "reward": r,
                    "logp_ref": lp,
                    "logq_ref": lqr,
                    "logq_proposal": lqp,
                }
            )
    return rows


def _hand_anchor(items, beta, lam):
    """Everything build_anchor reports for one prompt, by explicit float64 arithmetic."""
    w = []
    for r, lp, lqr, lqp in items:
        mu = (1 - lam) * math.exp(lqr) + lam * math.exp(lqp)
        w.append(math.exp(beta * r) * math.exp(lp) / mu)
    K = len(w)
    s1, s2 = sum(w), sum(x * x for x in w)
    ess = s1 * s1 / s2
    return {
        "log_z_hat": math.log(s1 / K),
        "K": K,
        "ess": ess,
        "ess_frac": ess / K,
        "max_weight": max(w) / s1,
        "bias": -(K / ess - 1) / (2 * K),
        "se": math.sqrt((K / ess - 1) / K),
        "n_rewarded": sum(1 for it in items if it[0] > 0),
    }


def test_build_anchor_by_hand():
    beta = 2.0
    # idx 2 unused
    a_ref = [
        (1.0, -1.2, -1.0, -3.0),
        (0.0, -0.7, -0.9, -2.0),
        (0.0, -9.0, -9.0, -9.0),
    ]
    # idx 2 unused
    a_prop = [
        (1.0, -1.5, -1.4, -0.4),
        (1.0, -2.5, -2.0, -0.9),
        (0.0, -1.0, -1.0, -1.0),
    ]
    b_ref = [(0.0, -0.5, -0.5, -2.5), (0.0, -1.1, -1.0, -1.7), (1.0, -3.0, -3.0, -3.0)]
    b_prop = [(0.0, -2.0, -2.2, -0.3), (1.0, -4.0, -3.5, -0.2), (0.0, -3.0, -3.0, -3.0)]
    scores = pd.DataFrame(_hand_rows("a", a_ref, a_prop) + _hand_rows("b", b_ref, b_prop))
    log_pc = pd.Series({"b": math.log(0.05), "a": math.log(0.15)})  # index order differs on purpose
    table = anchor.build_anchor(
        scores, beta=beta, K=4, strength=0.5, min_ess=2.0, log_p_correct=log_pc
    )
    assert list(table.prompt_id) == ["a", "b"]
    for pid, items, p in (("a", a_ref[:2] + a_prop[:2], 0.15), ("b", b_ref[:2] + b_prop[:2], 0.05)):
        row = table.set_index("prompt_id").loc[pid]
        want = _hand_anchor(items, beta, 0.5)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, rel=1e-10, abs=1e-12), (pid, k)
        log_z = math.log(1 - p + p * math.exp(beta))
        assert row["log_z"] == pytest.approx(log_z, rel=1e-12)
        assert row["error"] == pytest.approx(want["log_z_hat"] - log_z, abs=1e-10)
        assert bool(row["covered"]) == (abs(want["log_z_hat"] - log_z) <= 2 * want["se"])
        assert bool(row["degenerate"]) == (want["ess"] < 2.0)
        assert row["beta"] == beta and row["strength"] == 0.5 and row["strength_effective"] == 0.5
    assert set(table.covered) == {True, False}, "fixture should exercise both outcomes"


def test_build_anchor_uses_effective_lambda():
    # K=3, λ=0.5 → round(1.5) = 2 proposal samples: λ_eff = 2/3 in the density
    ref = [(1.0, -1.0, -1.1, -2.0), (0.0, -0.5, -0.6, -1.0)]
    prop = [(1.0, -1.3, -1.2, -0.5), (0.0, -2.0, -2.1, -0.7)]
    scores = pd.DataFrame(_hand_rows("x", ref, prop))
    table = anchor.build_anchor(scores, beta=1.0, K=3, strength=0.5)
    want = _hand_anchor(ref[:1] + prop[:2], 1.0, 2 / 3)
    assert table.loc[0, "strength_effective"] == pytest.approx(2 / 3)
    assert table.loc[0, "log_z_hat"] == pytest.approx(want["log_z_hat"], rel=1e-12)
    assert "log_z" not in table


def test_build_anchor_ref_only_without_proposal_column():
    ref = [(1.0, -1.0, -1.0, None), (0.0, -0.5, -0.5, None), (0.0, -2.0, -2.0, None)]
    scores = pd.DataFrame(_hand_rows("r", ref, [])).drop(columns="logq_proposal")
    table = anchor.build_anchor(scores, beta=3.0, K=3, strength=0.0)
    # μ = π_ref: weights are e^{βr}
    assert table.loc[0, "log_z_hat"] == pytest.approx(math.log((math.exp(3.0) + 2) / 3), rel=1e-12)
    assert table.loc[0, "n_rewarded"] == 1


def test_build_anchor_degenerate_flag():
    # one rewarded sample with a large weight dominates prompt "d"; "e" has equal weights
    d = [
        (1.0, -1.0, -1.0, -1.0),
        (0.0, -1.0, -1.0, -1.0),
        (0.0, -1.0, -1.0, -1.0),
        (0.0, -1.0, -1.0, -1.0),
    ]
    e = [(0.0, -1.0, -1.0, -1.0)] * 4
    scores = pd.DataFrame(_hand_rows("d", d, []) + _hand_rows("e", e, [])).drop(
        columns="logq_proposal"
    )
    table = anchor.build_anchor(scores, beta=10.0, K=4, strength=0.0, min_ess=2.0).set_index(
        "prompt_id"
    )
    assert table.loc["d", "ess"] < 1.01 and table.loc["d", "max_weight"] > 0.99
    assert bool(table.loc["d", "degenerate"]) and not bool(table.loc["e", "degenerate"])
    assert table.loc["e", "ess"] == pytest.approx(4.0)


@pytest.mark.parametrize("column", ["reward", "logp_ref"])
def test_build_anchor_refuses_nan(column):
    df = _scores(prompts=("ok-1", "bad-prompt-7", "ok-2"))
    hit = (df.prompt_id == "bad-prompt-7") & (df.component == "ref") & (df.sample_idx == 0)
    df.loc[hit, column] = np.nan
    with pytest.raises(ValueError, match="bad-prompt-7") as e:
        anchor.build_anchor(df, beta=1.0, K=4, strength=0.5)
    assert column in str(e.value) and "ok-1" not in str(e.value)


def test_anchor_summary_keys():
    table = anchor.build_anchor(
        _scores(), beta=1.0, K=4, strength=0.5, log_p_correct=pd.Series({"p0": -1.0, "p1": -2.0})
    )
    s = anchor.anchor_summary(table)
    assert s["anchor.prompts"] == 2
    assert s["anchor.mean_log_z_hat"] == pytest.approx(table.log_z_hat.mean())
    assert 0 <= s["anchor.coverage_2se"] <= 1


def _summary_table() -> pd.DataFrame:
    """A hand-made anchor table of 3 prompts whose columns make every reduction distinct
    (mean ≠ sum ≠ min ≠ max, signs mixed)."""
    return pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c"],
            "log_z_hat": [0.5, -1.0, 2.0],
            "ess_frac": [0.25, 0.5, 1.0],
            "ess": [1.0, 2.0, 4.0],
            "se": [0.3, 0.6, 1.2],
            "bias": [-0.1, -0.2, -0.6],
            "degenerate": [True, False, False],
            "n_rewarded": [0, 1, 5],
            "log_z": [0.1, -0.8, 3.1],
            "error": [0.4, -0.2, -1.1],
            "covered": [True, True, False],
        }
    )


def test_anchor_summary_values_by_hand():
    s = anchor.anchor_summary(_summary_table())
    want = {
        "anchor.prompts": 3,
        "anchor.mean_log_z_hat": (0.5 - 1.0 + 2.0) / 3,
        "anchor.mean_ess_frac": (0.25 + 0.5 + 1.0) / 3,
        "anchor.min_ess": 1.0,
        "anchor.mean_se": (0.3 + 0.6 + 1.2) / 3,
        "anchor.mean_bias_delta": (-0.1 - 0.2 - 0.6) / 3,
        "anchor.degenerate_prompts": 1,
        "anchor.mean_rewarded": 2.0,
        "anchor.mean_abs_error": (0.4 + 0.2 + 1.1) / 3,
        "anchor.mean_error": (0.4 - 0.2 - 1.1) / 3,
        "anchor.coverage_2se": 2 / 3,
    }
    assert s.keys() == want.keys()
    for k, v in want.items():
        assert s[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    # without the exact log Z the error statistics are absent, not zero
    s = anchor.anchor_summary(_summary_table().drop(columns=["log_z", "error", "covered"]))
    assert not any(
        k in s for k in ("anchor.mean_abs_error", "anchor.mean_error", "anchor.coverage_2se")
    )


def test_is_diagnostics_log_weights_spanning_more_than_exp_range():
    # exp(800) overflows float64; the diagnostics must only depend on weight ratios
    log_w = np.array([5.0, -800.0, 0.0, -1000.0])
    d = anchor.is_diagnostics(log_w)
    w = [1.0, 0.0, math.exp(-5.0), 0.0]  # normalised by the largest, by hand
    s1, s2 = sum(w), sum(x * x for x in w)
    assert d["ess"] == pytest.approx(s1 * s1 / s2, rel=1e-12)
    assert d["max_weight"] == pytest.approx(1.0 / s1, rel=1e-12)
    assert all(math.isfinite(v) for v in d.values())


def test_select_trajectories_refuses_a_prompt_with_fewer_samples():
    # p0 has 5 samples per component, p1 only 3 of π_ref's: K=8 at λ=0.5 needs 4 of each
    df = _scores()
    df = df[~((df.prompt_id == "p1") & (df.component == "ref") & (df.sample_idx >= 3))]
    with pytest.raises(
        ValueError,
        match="needs 4 samples per prompt from the 'ref' component, but the rollout cache has 3",
    ):
        anchor.select_trajectories(df, 8, 0.5)
    traj, _ = anchor.select_trajectories(df, 6, 0.5)  # 3 of each is enough for everyone
    assert traj.groupby("prompt_id").size().to_dict() == {"p0": 6, "p1": 6}


def test_build_anchor_ess_equal_to_min_ess_is_not_degenerate():
    # K=2 with equal weights: ESS is exactly 2.0, the threshold; degenerate means ESS < min_ess
    items = [(0.0, -1.0, -1.0, None)] * 2
    scores = pd.DataFrame(_hand_rows("k2", items, [])).drop(columns="logq_proposal")
    table = anchor.build_anchor(scores, beta=1.0, K=2, strength=0.0, min_ess=2.0)
    assert table.loc[0, "ess"] == 2.0
    assert not bool(table.loc[0, "degenerate"])
    table = anchor.build_anchor(scores, beta=1.0, K=2, strength=0.0, min_ess=2.0 + 1e-9)
    assert bool(table.loc[0, "degenerate"])


# -- float64 throughout, whatever the caller's dtype ------------------------------------------
# The scorer may hand over float32 log-probs. Every estimator computes in float64, so its
# result equals the float64 computation on the same (exactly widened) float32 values.
def _f32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


def _f64(*arrays):
    return [np.asarray(a, np.float32).astype(np.float64) for a in arrays]


def test_estimators_compute_in_float64_from_float32_inputs():
    rng = np.random.default_rng(3)
    reward, logp, logmu = rng.integers(0, 2, 7), -rng.uniform(1, 30, 7), -rng.uniform(1, 30, 7)
    beta = 0.1  # not a float32 number: β·r in float32 would round
    got = anchor.log_weights(*_f32(reward, logp, logmu), beta)
    want = anchor.log_weights(*_f64(reward, logp, logmu), beta)
    assert got.dtype == np.float64 and np.array_equal(got, want)
    (lw32,), (lw64,) = _f32(want), _f64(want)
    assert anchor.log_z_hat(lw32) == anchor.log_z_hat(lw64)
    assert anchor.is_diagnostics(lw32) == anchor.is_diagnostics(lw64)
    q_ref, q_prop = -rng.uniform(1, 30, 7), -rng.uniform(1, 30, 7)
    for lam in (0.0, 0.3, 1.0):
        got = anchor.mixture_log_density(*_f32(q_ref, q_prop), lam)
        assert got.dtype == np.float64 and np.array_equal(
            got, anchor.mixture_log_density(*_f64(q_ref, q_prop), lam)
        ), lam
    (b32,), (b64,) = _f32([0.7, 3.3]), _f64([0.7, 3.3])
    assert np.array_equal(theory.binary_ess_frac(0.2, b32), theory.binary_ess_frac(0.2, b64))
    (e32,), (e64,) = _f32([0.3, 0.7]), _f64([0.3, 0.7])
    assert np.array_equal(theory.predicted_var(16, e32), theory.predicted_var(16, e64))
    (x32,), (x64,) = _f32([0.1, 2.3]), _f64([0.1, 2.3])
    assert np.array_equal(theory._log_expm1(x32), theory._log_expm1(x64))


def test_check_finite_refuses_missing_values_in_an_object_column():
    df = _scores()
    df["reward"] = df.reward.astype(object)
    df.loc[(df.prompt_id == "p1") & (df.sample_idx == 0), "reward"] = None
    with pytest.raises(
        ValueError,
        match=r"^non-finite reward for 2 trajectories \(prompt ids \['p1'\]\); refusing to anchor on them$",
    ):
        anchor.build_anchor(df, beta=1.0, K=4, strength=0.5)


def test_check_finite_names_at_most_five_prompts():
    df = _scores(prompts=tuple(f"q{i}" for i in range(7)))
    df.loc[df.sample_idx == 0, "logp_ref"] = np.inf
    with pytest.raises(ValueError) as e:
        anchor.build_anchor(df, beta=1.0, K=4, strength=0.5)
    named = [f"q{i}" for i in range(7) if f"'q{i}'" in str(e.value)]
    assert len(named) == 5 and "non-finite logp_ref for 14 trajectories" in str(e.value)


def test_is_diagnostics_ess_rounded_above_k_reports_zero_bias_and_se():
    # nearly equal weights whose ESS rounds to 1.0000000000000002·K in float64
    log_w = np.array(
        [
            -7.037352358069926e-10,
            -1.2654214710460525e-09,
            -6.232744625373522e-10,
            4.13259793472436e-11,
            -2.3250307746388344e-09,
            -2.1879166393254575e-10,
        ]
    )
    d = anchor.is_diagnostics(log_w)
    assert d["ess_frac"] > 1.0  # the premise: rounding really did overshoot
    assert d["se"] == 0.0 and d["bias"] == 0.0


def test_is_diagnostics_equal_weights_bias_is_positive_zero():
    d = anchor.is_diagnostics(np.zeros(4))
    assert d["bias"] == 0.0 and math.copysign(1.0, d["bias"]) == 1.0  # "-0.0" would print in tables


def test_select_trajectories_a_missing_component_refused_even_for_one_sample():
    # K=2 at λ=0.5 needs a single proposal sample; a cache without the component has none
    with pytest.raises(
        ValueError,
        match="needs 1 samples per prompt from the 'proposal' component, but the rollout cache has 0$",
    ):
        anchor.select_trajectories(_scores(with_proposal=False), 2, 0.5)


def test_select_trajectories_returns_the_score_columns_with_a_fresh_index():
    df = _scores()
    traj, _ = anchor.select_trajectories(df, 4, 0.5)
    assert list(traj.columns) == list(df.columns)
    assert traj.index.equals(pd.RangeIndex(len(traj)))


def test_build_anchor_default_min_ess_is_two():
    # weights (e^β, 1, 1, 1) with μ = π_ref: at β = 1.5, 2 < ESS < 3, so the default
    # threshold 2 (and no other integer) decides that the prompt is not degenerate
    beta = 1.5
    w = [math.exp(beta), 1.0, 1.0, 1.0]
    ess = sum(w) ** 2 / sum(x * x for x in w)
    assert 2.0 < ess < 3.0
    items = [(1.0, -1.0, -1.0, None)] + [(0.0, -1.0, -1.0, None)] * 3
    scores = pd.DataFrame(_hand_rows("m", items, [])).drop(columns="logq_proposal")
    table = anchor.build_anchor(scores, beta=beta, K=4, strength=0.0)
    assert table.loc[0, "ess"] == pytest.approx(ess, rel=1e-12)
    assert not bool(table.loc[0, "degenerate"])


def test_build_anchor_rows_follow_the_prompts_first_appearance():
    df = pd.concat([_scores(prompts=("zeta",), seed=1), _scores(prompts=("alpha", "mid"), seed=2)])
    df = pd.concat([df[df.prompt_id == p] for p in ("zeta", "alpha", "mid")], ignore_index=True)
    table = anchor.build_anchor(df, beta=1.0, K=4, strength=0.5)
    assert list(table.prompt_id) == ["zeta", "alpha", "mid"]


def test_build_anchor_exact_estimate_with_zero_se_is_covered():
    # no rewarded answer anywhere and μ = π_ref: every weight is 1, log Ẑ = 0 = log Z, se = 0.
    # |error| ≤ 2·se holds with equality, and an exact estimate must count as covered.
    items = [(0.0, -2.0, -2.0, None)] * 4
    scores = pd.DataFrame(_hand_rows("none", items, [])).drop(columns="logq_proposal")
    table = anchor.build_anchor(
        scores, beta=2.0, K=4, strength=0.0, log_p_correct=pd.Series({"none": -np.inf})
    )
    row = table.loc[0]
    assert row["error"] == 0.0 and row["se"] == 0.0 and bool(row["covered"])


def test_exact_log_z_clamps_a_log_p_correct_rounded_above_zero():
    # a log-sum-exp over every answer can round to +1e-12; P cannot exceed 1, so log Z = β
    for beta in (0.5, 3.0, 40.0):
        assert float(theory.exact_log_z(1e-9, beta)) == float(theory.exact_log_z(0.0, beta)), beta


def test_boundary_values_compute_without_numpy_warnings():
    # log 0 and 0·log 0 occur by design at P ∈ {0, 1} and log Z = 0; they are handled, not warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(theory.p_correct_from_log_z(0.0, 2.0)) == 0.0
        for p in (0.0, 1.0):
            bias, var = theory.binary_mc_moments(6, p, 2.0)
            assert (bias, var) == (pytest.approx(0.0, abs=1e-15), pytest.approx(0.0, abs=1e-15)), p


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_binary_mc_moments_degenerate_reward_is_exact(p):
    # P = 0: every sample unrewarded, Ẑ = 1 = Z; P = 1: every sample rewarded, Ẑ = e^β = Z
    bias, var = theory.binary_mc_moments(5, p, 1.7)
    assert math.isfinite(bias) and math.isfinite(var)
    assert abs(bias) < 1e-15 and abs(var) < 1e-15
