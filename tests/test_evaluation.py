"""disa.evaluation against brute force and hand-computed values."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from disa import evaluation


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert evaluation.pass_at_k(n, c, k) == pytest.approx(
                _pass_at_k_brute(n, c, k), abs=1e-12
            ), (n, c, k)


def test_pass_at_k_large_n_matches_exact_binomials():
    n, c, k = 200, 3, 50
    want = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        evaluation.pass_at_k(n, c, k)


def _samples() -> pd.DataFrame:
    rows = [
        # A: 3 correct of 4, two distinct correct texts
        ("A", "1+2", 1.0),
        ("A", "2+1", 1.0),
        ("A", "1+2", 1.0),
        ("A", "x", 0.0),
        # B: unsolved, but a text repeated (must not count as "unique correct")
        ("B", "9+9", 0.0),
        ("B", "9+9", 0.0),
        ("B", "7", 0.0),
        ("B", "", 0.0),
        # C: 1 correct of 4
        ("C", "0+3", 1.0),
        ("C", "3", 0.0),
        ("C", "33", 0.0),
        ("C", "1+1", 0.0),
    ]
    return pd.DataFrame(rows, columns=["prompt_id", "text", "reward"])


def test_sample_metrics_by_hand():
    s = _samples()
    sizes = pd.Series({"C": 4, "A": 4, "B": 5})
    m = evaluation.sample_metrics(s, [1, 2, 4, 8], sizes)
    assert m["k"] == 4
    assert m["mean_at_k"] == pytest.approx(4 / 12)
    assert m["pass_at_1"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)
    # pass@2: A: 1 − C(1,2)/C(4,2) = 1;  C: 1 − C(3,2)/C(4,2) = 1/2
    assert m["pass_at_2"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["pass_at_4"] == pytest.approx(2 / 3)
    assert "pass_at_8" not in m  # more than k samples
    assert m["solved_frac"] == pytest.approx(2 / 3)
    assert m["unique_correct"] == pytest.approx((2 + 1) / 2)  # unsolved B excluded
    assert m["coverage"] == pytest.approx((2 / 4 + 0 / 5 + 1 / 4) / 3)
    # character distinct-2 over all completions, by an explicit loop
    grams = [t[i : i + 2] for t in s.text for i in range(len(t) - 1)]
    assert m["distinct_2"] == pytest.approx(len(set(grams)) / len(grams))


def test_sample_metrics_nothing_solved_has_no_unique_correct():
    s = _samples()
    s["reward"] = 0.0
    m = evaluation.sample_metrics(s, [1], pd.Series({"A": 4, "B": 5, "C": 4}))
    assert "unique_correct" not in m
    assert m["solved_frac"] == 0.0 and m["coverage"] == 0.0 and m["pass_at_1"] == 0.0


def test_distinct_n():
    assert evaluation.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a,b),(b,a),(a,b)
    assert evaluation.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert evaluation.distinct_n(["a b c"], 1) == 1.0
    assert evaluation.distinct_n(["abab", "ba"], 2, unit="char") == pytest.approx(2 / 4)
    assert evaluation.distinct_n(["aaa"], 3, unit="char") == 1.0
    assert math.isnan(evaluation.distinct_n(["a", ""], 2))
    with pytest.raises(ValueError, match="unit must be 'word' or 'char', got 'token'"):
        evaluation.distinct_n(["a b"], 2, unit="token")


# -- exact distances to the target p* ------------------------------------------------------
def _rewarded_frames():
    # prompt p: rewarded set {a, b}; π_ref(a) = .1, π_ref(b) = .3; π(a) = π(b) = .2
    # prompt q: rewarded set {x, y, z}; π_ref = .2, .2, .1; π = .05, .6, .05
    ref = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "q", "q", "q"],
            "answer": ["a", "b", "x", "y", "z"],
            "logp": np.log([0.1, 0.3, 0.2, 0.2, 0.1]),
        }
    )
    pol = pd.DataFrame(
        {
            "prompt_id": ["q", "p", "q", "p", "q"],
            "answer": ["z", "b", "y", "a", "x"],
            "logp": np.log([0.05, 0.2, 0.6, 0.2, 0.05]),
        }
    )
    return pol, ref


def _tv(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_target_distances_by_hand():
    pol, ref = _rewarded_frames()
    beta = math.log(2.0)  # e^β = 2
    # p: Z = (1 − .4) + .4·2 = 1.4;  p* = (.2, .6, .6)/1.4 on {a, b, rest};  π = (.2, .2, .6)
    zp = 1.4
    tp, pp = [0.2 / zp, 0.6 / zp, 0.6 / zp], [0.2, 0.2, 0.6]
    tcp, pcp = [0.25, 0.75], [0.5, 0.5]  # conditional on the rewarded set
    # q: P_ref = .5, Z = .5 + 1 = 1.5; p* = (.4, .4, .2, .5)/1.5;  π = (.05, .6, .05, .3)
    zq = 1.5
    tq, pq = [0.4 / zq, 0.4 / zq, 0.2 / zq, 0.5 / zq], [0.05, 0.6, 0.05, 0.3]
    tcq, pcq = [0.4, 0.4, 0.2], [0.05 / 0.7, 0.6 / 0.7, 0.05 / 0.7]
    assert sum(tp) == pytest.approx(1) and sum(tq) == pytest.approx(1)

    d = evaluation.target_distances(pol, ref, beta)
    assert d["tv_target"] == pytest.approx((_tv(tp, pp) + _tv(tq, pq)) / 2, rel=1e-10)
    assert d["kl_target"] == pytest.approx((_kl(tp, pp) + _kl(tq, pq)) / 2, rel=1e-10)
    assert d["tv_rewarded"] == pytest.approx((_tv(tcp, pcp) + _tv(tcq, pcq)) / 2, rel=1e-10)
    assert d["kl_rewarded"] == pytest.approx((_kl(tcp, pcp) + _kl(tcq, pcq)) / 2, rel=1e-10)
    assert d["p_correct_exact"] == pytest.approx((0.4 + 0.7) / 2, rel=1e-12)
    assert d["p_correct_target"] == pytest.approx((0.8 / zp + 1.0 / zq) / 2, rel=1e-12)


def test_target_distances_zero_at_the_target():
    _, ref = _rewarded_frames()
    beta = 1.3
    # the policy p* itself: on each rewarded answer π_ref e^β / Z
    pol = ref.copy()
    for _, g in ref.groupby("prompt_id"):
        P = np.exp(g.logp).sum()
        pol.loc[g.index, "logp"] = g.logp + beta - math.log(1 - P + P * math.exp(beta))
    d = evaluation.target_distances(pol, ref, beta)
    for k in ("tv_target", "kl_target", "tv_rewarded", "kl_rewarded"):
        assert abs(d[k]) < 1e-12, k
    assert d["p_correct_exact"] == pytest.approx(d["p_correct_target"], rel=1e-12)
    # π_ref is at distance 0 only conditionally on R
    d = evaluation.target_distances(ref, ref, beta)
    assert d["tv_rewarded"] < 1e-12 and d["tv_target"] > 0.1


@pytest.mark.parametrize("x", [-1e-300, -1e-20, -1e-8, -0.3, -0.6931, -0.6932, -1.0, -30.0, -700.0])
def test_log1mexp_against_50_digit_arithmetic(x):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        want = float(mpmath.log(-mpmath.expm1(mpmath.mpf(x))))  # expm1: no cancellation near 0
    assert evaluation._log1mexp(np.array([x]))[0] == pytest.approx(want, rel=1e-13)


def test_target_distances_when_pi_ref_puts_all_its_mass_on_correct_answers():
    # π_ref(R) = 1: Z = e^β, p* = π_ref on R and 0 elsewhere; π = (.3, .3) on R, .4 elsewhere
    ref = pd.DataFrame({"prompt_id": ["p", "p"], "answer": ["a", "b"], "logp": np.log([0.5, 0.5])})
    pol = ref.assign(logp=np.log([0.3, 0.3]))
    beta = 2.0
    with warnings.catch_warnings():  # log 0 of the empty rest is handled, not warned about
        warnings.simplefilter("error")
        d = evaluation.target_distances(pol, ref, beta)
    assert d["tv_target"] == pytest.approx(_tv([0.5, 0.5, 0.0], [0.3, 0.3, 0.4]), rel=1e-12)
    assert d["kl_target"] == pytest.approx(_kl([0.5, 0.5], [0.3, 0.3]), rel=1e-12)
    assert d["p_correct_target"] == pytest.approx(1.0, rel=1e-12)


def test_target_distances_refuses_mismatched_sets():
    pol, ref = _rewarded_frames()
    with pytest.raises(
        ValueError, match="^policy and reference rewarded-set tables do not cover the same answers$"
    ):
        evaluation.target_distances(pol.iloc[1:], ref, 1.0)
    # the same row counts, but one answer twice and another missing: still refused
    dup = pol.copy()
    dup.loc[dup.answer == "x", "answer"] = "y"
    with pytest.raises(ValueError):
        evaluation.target_distances(dup, ref, 1.0)
    dup = ref.copy()
    dup.loc[dup.answer == "x", "answer"] = "y"
    with pytest.raises(ValueError):
        evaluation.target_distances(pol.assign(answer=pol.answer.replace({"x": "w"})), dup, 1.0)


def test_target_distances_compute_in_float64_from_float32_tables():
    # log-probs often arrive as float32 (the scorer's dtype); the distances must not inherit
    # float32 rounding: compare against the float64 computation of the same float32 values
    pol, ref = _rewarded_frames()
    beta = math.log(2.0)
    want = evaluation.target_distances(pol, ref, beta)
    pol32, ref32 = pol.astype({"logp": np.float32}), ref.astype({"logp": np.float32})
    got = evaluation.target_distances(pol32, ref32, beta)
    exact = evaluation.target_distances(
        pol32.astype({"logp": np.float64}), ref32.astype({"logp": np.float64}), beta
    )
    for k in want:
        assert got[k] == pytest.approx(exact[k], rel=1e-13, abs=1e-15), k
    # log(1 − eˣ) of a float32 0 (all mass on the rewarded set) stays finite
    assert np.isfinite(evaluation._log1mexp(np.zeros(1, np.float32))).all()


# -- policy_metrics: the whole evaluation record ----------------------------------------------
def _policy_samples() -> pd.DataFrame:
    s = _samples()
    s["n_tokens"] = [3, 3, 3, 1, 3, 3, 1, 0, 3, 1, 2, 3]
    s["benchmark"] = ["one"] * 8 + ["two"] * 4  # A, B on "one"; C on "two"
    return s


def test_policy_metrics_per_benchmark_and_macro():
    s = _policy_samples()
    m = evaluation.policy_metrics(s, [1, 4], beta=1.0)
    whole = evaluation.sample_metrics(s, [1, 4])
    for k, v in whole.items():
        assert m[k] == v, k
    one = evaluation.sample_metrics(s[s.benchmark == "one"], [1, 4])
    two = evaluation.sample_metrics(s[s.benchmark == "two"], [1, 4])
    for k in one:
        assert m[f"one.{k}"] == one[k] and m[f"two.{k}"] == two[k], k
    assert m["one.mean_at_k"] == pytest.approx(3 / 8) and m["two.mean_at_k"] == pytest.approx(1 / 4)
    for k in ("mean_at_k", "pass_at_1", "pass_at_4"):
        assert m[f"macro.{k}"] == pytest.approx((one[k] + two[k]) / 2, rel=1e-15), k
    assert m["tokens_generated"] == 26 and m["reward_missing"] == 0
    assert not any(
        k.startswith("macro.")
        for k in evaluation.policy_metrics(s.drop(columns="benchmark"), [1], 1.0)
    )
    # one benchmark: its keys and the macro keys are there all the same
    m = evaluation.policy_metrics(s[s.benchmark == "one"], [1, 4], beta=1.0)
    assert m["one.mean_at_k"] == m["macro.mean_at_k"] == m["mean_at_k"] == pytest.approx(3 / 8)


def test_a_benchmark_with_no_graded_sample_is_counted_not_averaged_away():
    s = _policy_samples()
    s.loc[s.benchmark == "two", "reward"] = np.nan  # every sample of "two" failed grading
    m = evaluation.policy_metrics(s, [1], beta=1.0)
    assert (
        m["two.reward_missing"] == 4 and m["one.reward_missing"] == 0 and m["reward_missing"] == 4
    )
    assert "two.mean_at_k" not in m and "one.mean_at_k" in m
    assert not any(k.startswith("macro.") for k in m)  # not a macro over "one" alone
    s["reward"] = np.nan
    with pytest.raises(
        ValueError, match=r"every evaluation sample \(12 of benchmarks \['one', 'two'\]\) failed"
    ):
        evaluation.policy_metrics(s, [1], beta=1.0)


def test_policy_metrics_macro_only_where_every_benchmark_has_the_metric():
    s = _policy_samples()
    s = s[~((s.benchmark == "two") & (s.index % 4 >= 2))]  # "two" keeps 2 samples of C: no pass@4
    m = evaluation.policy_metrics(s, [1, 4], beta=1.0)
    assert "one.pass_at_4" in m and "two.pass_at_4" not in m
    assert "macro.pass_at_4" not in m and "macro.pass_at_1" in m


def test_policy_metrics_leaves_failed_grades_out_and_counts_them():
    s = _policy_samples()
    s.loc[[3, 9], "reward"] = np.nan  # one wrong A sample, one wrong C sample: grading failed
    m = evaluation.policy_metrics(s, [1], beta=1.0)
    graded = s.dropna(subset=["reward"])
    assert m["reward_missing"] == 2
    assert m["mean_at_k"] == pytest.approx(graded.reward.mean()) and m["k"] == 3
    assert m["tokens_generated"] == int(s.n_tokens.sum())  # the failed samples were still generated
    s["reward"] = np.nan
    with pytest.raises(
        ValueError,
        match=r"^every evaluation sample \(12 of benchmarks .*failed grading.*\(task.grader\)$",
    ):
        evaluation.policy_metrics(s, [1], beta=1.0)


def test_policy_metrics_exact_distances_over_the_evaluated_prompts_only():
    pol, ref = _rewarded_frames()
    extra = pd.DataFrame({"prompt_id": ["z"], "answer": ["q"], "logp": [math.log(0.5)]})
    samples = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "q", "q"],
            "text": ["a", "c", "x", "y"],
            "reward": [1.0, 0.0, 1.0, 1.0],
            "n_tokens": [1, 1, 1, 1],
        }
    )
    beta = math.log(2.0)
    m = evaluation.policy_metrics(
        samples,
        [1],
        beta,
        rewarded=pd.concat([pol, extra.assign(logp=-3.0)]),
        ref_rewarded=pd.concat([ref, extra]),
    )
    want = evaluation.target_distances(pol, ref, beta)
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-13), k
    # coverage: distinct correct over the rewarded-set size, p: 1/2, q: 2/3
    assert m["coverage"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # without the policy's own table there are no distances, but coverage still is reported
    m = evaluation.policy_metrics(samples, [1], beta, ref_rewarded=ref)
    assert "tv_target" not in m and m["coverage"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    m = evaluation.policy_metrics(samples, [1], beta, rewarded=pol)
    assert "tv_target" not in m and "coverage" not in m


def test_per_prompt_metrics_average_to_the_reported_ones():
    """The per-prompt table (what paired comparisons resample) and the summary agree: the
    mean over prompts of each column is the summary's figure (unique_correct over solved
    prompts, as the summary defines it)."""
    s = _samples()
    sizes = pd.Series({"C": 4, "A": 4, "B": 5})
    table = evaluation.sample_metrics_per_prompt(s, [1, 2, 4], sizes)
    m = evaluation.sample_metrics(s, [1, 2, 4], sizes)
    assert table.prompt_id.tolist() == ["A", "B", "C"]
    assert table.mean_at_k.tolist() == pytest.approx([3 / 4, 0, 1 / 4])
    assert table.pass_at_2.tolist() == pytest.approx([1, 0, 0.5])
    assert table.solved.tolist() == [1.0, 0.0, 1.0]
    assert table.unique_correct.tolist()[0::2] == [2.0, 1.0] and math.isnan(table.unique_correct[1])
    assert table.coverage.tolist() == pytest.approx([2 / 4, 0 / 5, 1 / 4])
    for key in ("mean_at_k", "pass_at_1", "pass_at_2", "pass_at_4", "unique_correct", "coverage"):
        assert table[key].mean() == pytest.approx(m[key], rel=1e-12), key
    assert table.solved.mean() == pytest.approx(m["solved_frac"])

    pol, ref = _rewarded_frames()
    beta = math.log(2.0)
    exact = evaluation.target_distances_per_prompt(pol, ref, beta)
    # by hand (see above)
    assert exact.p_correct_exact.tolist() == pytest.approx([0.4, 0.7], rel=1e-12)
    summary = evaluation.target_distances(pol, ref, beta)
    for key, value in summary.items():
        assert exact[key].mean() == pytest.approx(value, rel=1e-12), key


def test_per_prompt_metrics_joins_sample_and_exact_metrics_over_the_evaluated_prompts():
    pol, ref = _rewarded_frames()
    prompts = sorted(set(ref.prompt_id))
    samples = pd.DataFrame(
        {
            "prompt_id": [prompts[0]] * 2,
            "text": ["a", "zz"],
            "reward": [1.0, np.nan],
            "n_tokens": [1, 2],
        }
    )
    table = evaluation.per_prompt_metrics(samples, [1], 0.7, pol, ref)
    # the exact metrics of the evaluated prompts only
    assert table.prompt_id.tolist() == [prompts[0]]
    assert table.mean_at_k.tolist() == [1.0]  # the failed grade is left out, as in policy_metrics
    only = evaluation.target_distances_per_prompt(
        pol[pol.prompt_id == prompts[0]], ref[ref.prompt_id == prompts[0]], 0.7
    )
    assert table.tv_target.tolist() == pytest.approx(only.tv_target.tolist(), rel=1e-15)
