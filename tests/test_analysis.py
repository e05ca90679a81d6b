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


def test_mean_se_sorts_groups_and_counts_rows():
    df = pd.DataFrame(
        {
            "alg": ["b", "a", "b", "a", "a"],
            "seed": [0, 0, 1, 1, 2],
            "m": [3.0, 1.0, 5.0, np.nan, 2.0],
        }
    )
    agg = analysis.mean_se(df, ["alg"], ["m"])
    assert agg.alg.tolist() == ["a", "b"] and agg.index.tolist() == [0, 1]
    assert agg.columns.tolist() == ["alg", "m.mean", "m.se", "n"]
    # n counts the group's rows (runs), the se the runs that have the metric
    assert agg.n.tolist() == [3, 2]
    assert agg["m.se"].tolist() == pytest.approx(
        [math.sqrt(0.5) / math.sqrt(2), math.sqrt(2) / math.sqrt(2)]
    )
    two = analysis.mean_se(df, ["alg", "seed"], ["m"])
    assert list(zip(two.alg, two.seed)) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    empty = analysis.mean_se(df.iloc[:0], ["alg"], ["m"])  # no runs: no rows, same columns
    assert empty.columns.tolist() == ["alg", "m.mean", "m.se", "n"] and len(empty) == 0


def test_pass_at_k_curves_order_and_missing_model():
    df = pd.DataFrame(
        {
            "algorithm": ["y", "x", "x"],
            "method": ["m", "m", "m"],
            "policy.pass_at_16": [0.9, 0.5, 0.7],
            "policy.pass_at_4": [0.3, 0.1, 0.2],
            "ref.pass_at_2": [0.05, 0.1, 0.3],
        }
    )
    c = analysis.pass_at_k_curves(df)
    assert c.columns.tolist() == ["algorithm", "model", "k", "mean", "se", "n"]
    assert c.index.tolist() == list(range(6))
    # ref first; k numerically (4 before 16); groups sorted
    assert list(zip(c.model, c.k, c.algorithm)) == [
        ("ref", 2, "x"),
        ("ref", 2, "y"),
        ("policy", 4, "x"),
        ("policy", 4, "y"),
        ("policy", 16, "x"),
        ("policy", 16, "y"),
    ]
    assert c["mean"].tolist() == pytest.approx([0.2, 0.05, 0.15, 0.3, 0.6, 0.9])
    assert c.n.tolist() == [2, 1, 2, 1, 2, 1]
    assert c.se.iloc[4] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))
    # a model without pass@k columns is left out, not an error
    only_policy = analysis.pass_at_k_curves(df.drop(columns="ref.pass_at_2"), by=["method"])
    assert only_policy.model.tolist() == ["policy", "policy"] and only_policy.k.tolist() == [4, 16]
    assert only_policy["mean"].tolist() == pytest.approx([0.2, 0.7])


def test_comparison_table_formats_mean_and_se():
    df = pd.DataFrame(
        {
            "algorithm": ["b", "a", "a"],
            "policy.mean_at_k": [0.5, 0.1, 0.3],
            "train.wall_s": [np.nan, 1234.5, 1236.5],
        }
    )
    t = analysis.comparison_table(df)
    assert t.columns.tolist() == ["algorithm", "seeds", "policy.mean_at_k", "train.wall_s"]
    assert t.algorithm.tolist() == ["a", "b"] and t.seeds.tolist() == [2, 1]
    # a: mean 0.2, sd √0.02, se 0.1; wall: mean 1235.5, sd √2, se 1
    assert t["policy.mean_at_k"].tolist() == ["0.2 ± 0.1", "0.5"]  # one seed: no ± part
    assert t["train.wall_s"].tolist() == ["1.24e+03 ± 1", "–"]  # missing: a dash
    t2 = analysis.comparison_table(df, metrics=["train.wall_s", "absent"])
    assert t2.columns.tolist() == ["algorithm", "seeds", "train.wall_s"]
    assert analysis.stats._fmt(0.123456, 0.0123456) == "0.123 ± 0.012"


# -- paired differences ----------------------------------------------------------------------
def _arms(values: dict[str, list[list[float]]]) -> pd.DataFrame:
    """A per-prompt table from ``arm → [seed][prompt] values`` of one metric ``m``."""
    rows = [
        {"arm": arm, "seed": s, "prompt_id": f"q{p}", "m": v}
        for arm, grid in values.items()
        for s, row in enumerate(grid)
        for p, v in enumerate(row)
    ]
    return pd.DataFrame(rows)


def _exact_bootstrap_means(d: np.ndarray) -> np.ndarray:
    """The mean of ``d [S, P]`` over every ordered resample of seeds and of prompts (S^S · P^P
    equally likely outcomes): the exact distribution the bootstrap draws from."""
    S, P = d.shape
    return np.array(
        [
            d[np.ix_(si, pi)].mean()
            for si in itertools.product(range(S), repeat=S)
            for pi in itertools.product(range(P), repeat=P)
        ]
    )


def test_paired_differences_against_the_exact_bootstrap_distribution():
    base = [[0.1, 0.5, 0.2], [0.3, 0.0, 0.4]]
    other = [[0.3, 0.4, 0.9], [0.2, 0.6, 0.5]]
    d = np.array(other) - np.array(base)
    out = analysis.paired_differences(
        _arms({"b": base, "a": other}), "b", ["m"], n_boot=40000, seed=1
    )
    row = out.iloc[0]
    assert (row.arm, row.baseline, row.metric, row.seeds, row.prompts) == ("a", "b", "m", 2, 3)
    assert row["diff"] == pytest.approx(d.mean(), abs=1e-15)
    exact = np.sort(_exact_bootstrap_means(d))
    # the bootstrap's 2.5% and 97.5% quantiles against the exact distribution's, within ±0.5%
    # of probability (the Monte Carlo error of 40,000 draws is about 0.08%)
    for q, got in ((0.025, row.ci_low), (0.975, row.ci_high)):
        lo, hi = np.quantile(exact, [q - 0.005, q + 0.005])
        assert lo - 1e-12 <= got <= hi + 1e-12, (q, got, lo, hi)
    assert row.significant == (row.ci_low > 0 or row.ci_high < 0)


def test_paired_differences_marks_what_excludes_zero_and_skips_missing_cells():
    base = [[0.0, 0.2, 0.4], [0.1, 0.3, 0.5]]
    shifted = [[x + 0.25 for x in r] for r in base]
    holes = [[0.0, float("nan"), 0.9], [0.1, 0.3, float("nan")]]
    out = analysis.paired_differences(
        _arms({"base": base, "shift": shifted, "same": base, "holes": holes}), "base", ["m"]
    ).set_index("arm")
    assert out.loc["shift", "diff"] == pytest.approx(0.25)
    assert out.loc["shift", ["ci_low", "ci_high"]].tolist() == pytest.approx([0.25, 0.25])
    assert bool(out.loc["shift", "significant"])
    assert (
        out.loc["same", ["diff", "ci_low", "ci_high"]].tolist() == [0, 0, 0]
        and not out.loc["same", "significant"]
    )
    # the 4 cells both arms have
    assert out.loc["holes", "diff"] == pytest.approx((0 + 0.5 + 0 + 0) / 4)
    assert out.loc["holes", "ci_low"] >= 0 and out.loc["holes", "ci_high"] <= 0.5
    # the baseline is not compared with itself
    assert sorted(out.index) == [
        "holes",
        "same",
        "shift",
    ]


def test_paired_differences_refuses_repeated_rows_and_unknown_baselines():
    t = _arms({"a": [[0.1, 0.2]], "b": [[0.3, 0.4]]})
    with pytest.raises(ValueError, match=r"1 rows repeat an \(arm, seed, prompt_id\)"):
        analysis.paired_differences(pd.concat([t, t.iloc[:1]]), "a", ["m"])
    with pytest.raises(ValueError, match=r"baseline='disa' is not an arm; allowed: \['a', 'b'\]"):
        analysis.paired_differences(t, "disa", ["m"])
    with pytest.raises(ValueError, match=r"level=1.5; allowed"):
        analysis.paired_differences(t, "a", ["m"], level=1.5)


def test_with_arms_keeps_one_pi_ref_per_seed_and_prompt():
    def run(alg, seed, ref_value, pol_value):
        return pd.DataFrame(
            {
                "algorithm": alg,
                "seed": seed,
                "prompt_id": ["q0", "q1"],
                "model": ["ref", "ref"],
                "mean_at_k": ref_value,
            }
        ).pipe(lambda d: pd.concat([d, d.assign(model="policy", mean_at_k=pol_value)]))

    table = pd.concat(
        [run("disa", 0, 0.1, 0.3), run("grpo", 0, 0.1, 0.6), run("disa", 1, 0.2, 0.4)]
    )
    arms = analysis.with_arms(table)
    assert sorted(arms.arm.value_counts().items()) == [("disa", 4), ("grpo", 2), ("π_ref", 4)]
    vs_ref = analysis.paired_differences(arms, analysis.REF_ARM, ["mean_at_k"]).set_index("arm")
    assert vs_ref.loc["disa", "diff"] == pytest.approx(0.2) and vs_ref.loc[
        "grpo", "diff"
    ] == pytest.approx(0.5)
    table.loc[(table.algorithm == "grpo") & (table.model == "ref"), "mean_at_k"] = (
        0.9  # another π_ref
    )
    with pytest.raises(ValueError, match="π_ref's per-prompt metrics differ between runs"):
        analysis.with_arms(table)


def test_paired_table_formats_differences_and_marks():
    diffs = pd.DataFrame(
        {
            "arm": ["a", "a", "b"],
            "metric": ["m", "n", "m"],
            "diff": [0.12, -0.01, 0.0],
            "ci_low": [0.08, -0.05, 0.0],
            "ci_high": [0.16, 0.02, 0.0],
            "significant": [True, False, False],
        }
    )
    t = analysis.paired_table(diffs)
    assert t.to_dict("list") == {
        "arm": ["a", "b"],
        "m": ["+0.120 [+0.080, +0.160]*", "+0.000 [+0.000, +0.000]"],
        "n": ["-0.010 [-0.050, +0.020]", "–"],
    }


def _fake_eval_run(path, algorithm, seed, ref, policy, beta=2.0, online=False):
    """A run directory with a summary and a per-prompt table (``ref``/``policy``: p_correct_exact
    per prompt q0, q1, q2)."""
    path.mkdir(parents=True)
    summary = {"algorithm": algorithm, "seed": seed, "beta": beta, "policy.mean_at_k": 0.1}
    if not online:  # only runs that drew proposal samples report the realised λ
        summary["proposal.strength_effective"] = 0.5
    (path / "summary.json").write_text(json.dumps(summary))
    ids = ["q0", "q1", "q2"]
    pd.concat(
        [
            pd.DataFrame({"prompt_id": ids, "model": "ref", "p_correct_exact": ref}),
            pd.DataFrame({"prompt_id": ids, "model": "policy", "p_correct_exact": policy}),
        ]
    ).to_parquet(path / "eval_per_prompt.parquet")


def test_paired_comparisons_of_a_sweep_and_the_comparison_file(tmp_path):
    ref = [0.1, 0.2, 0.3]
    for seed in (0, 1):
        _fake_eval_run(tmp_path / f"d{seed}", "disa", seed, ref, [0.3, 0.4, 0.5])
        _fake_eval_run(tmp_path / f"g{seed}", "grpo", seed, ref, [0.9, 0.9, 0.9], online=True)
    diffs = analysis.paired_comparisons(tmp_path, metrics=("p_correct_exact",))
    got = {(r.arm, r.baseline): r.diff for r in diffs.itertuples()}
    assert got == pytest.approx(
        {
            ("grpo", "disa"): 0.5,
            ("π_ref", "disa"): -0.2,
            ("disa", "π_ref"): 0.2,
            ("grpo", "π_ref"): 0.7,
        }
    )
    assert diffs.significant.all() and set(diffs.seeds) == {2} and set(diffs.prompts) == {3}
    out = analysis.write_comparison(tmp_path)
    text = out["md"].read_text()
    assert "Paired difference from disa" in text and "Paired difference from π_ref" in text
    assert "+0.500 [+0.400, +0.600]*" in text  # grpo − disa: d = (0.6, 0.5, 0.4) on every seed
    assert pd.read_csv(out["paired"]).shape[0] == len(diffs)


def test_paired_comparisons_within_each_setting_a_sweep_varies(tmp_path):
    for beta, shift in ((1.0, 0.1), (4.0, 0.3)):
        for seed in (0, 1):
            _fake_eval_run(
                tmp_path / f"{beta}_{seed}",
                "disa",
                seed,
                [0.1, 0.2, 0.3],
                [0.1 + shift, 0.2 + shift, 0.3 + shift],
                beta=beta,
            )
    diffs = analysis.paired_comparisons(tmp_path, metrics=("p_correct_exact",))
    assert diffs.set_index("beta")["diff"].to_dict() == pytest.approx({1.0: 0.1, 4.0: 0.3})
    for run in tmp_path.iterdir():  # runs from before per-prompt tables: no paired comparison
        (run / "eval_per_prompt.parquet").unlink()
    assert analysis.paired_comparisons(tmp_path) is None


def test_anchor_calibration_by_hand_and_the_figure(tmp_path):
    anchors = pd.DataFrame(
        {
            "seed": [0, 0, 0, 1, 1, 1],
            "log_z": [0.1, 0.5, 0.9, 0.1, 0.5, 0.9],
            "log_z_hat": [0.2, 0.4, 1.0, 0.1, 0.6, 0.8],
        }
    )
    anchors["error"] = anchors.log_z_hat - anchors.log_z
    cal = analysis.anchor_calibration(anchors).set_index("seed")
    assert cal.loc[0, "error"] == pytest.approx(0.1 / 3) and cal.loc[
        0, "abs_error"
    ] == pytest.approx(0.1)
    assert cal.loc[1, "error"] == pytest.approx(0.0, abs=1e-15) and cal.loc[
        1, "abs_error"
    ] == pytest.approx(0.2 / 3)
    x, y = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.4, 1.0])
    r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
    )
    assert cal.loc[0, "corr"] == pytest.approx(r, rel=1e-12)
    curves = pd.DataFrame(
        {
            "step": [9, 19, 9, 19],
            "seed": [0, 0, 1, 1],
            "train/log_z_phi_error": [-0.5, -0.4, -0.6, -0.5],
            "train/log_z_phi_abs_error": [0.5, 0.4, 0.6, 0.5],
            "train/log_z_phi_corr": [0.1, 0.2, 0.0, 0.3],
        }
    )
    path = analysis.plot_log_z_calibration(curves, anchors, tmp_path / "calibration.png")
    assert path.stat().st_size > 1000


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


def test_describe_skipped():
    assert (
        studies.describe_skipped([(256, 0.0), (128, 0.5), (256, 0.5)])
        == "λ=0: K=256; λ=0.5: K=128,256"
    )
    assert studies.describe_skipped([]) == ""


# -- naive references for the study: loops over the samples, float64, the math module --------
def _split(K, lam):
    k_prop = int(round(lam * K))
    return K - k_prop, k_prop


def _reference_ess(scores, beta, lam, log_z):
    """{prompt: (ess_frac_pop, ess_frac_strat)} from every cached sample, by loops."""
    frac = {"ref": 1.0 - lam, "proposal": lam}
    m2, var = {}, {}
    for (pid, comp), g in scores.groupby(["prompt_id", "component"]):
        if frac[comp] == 0:
            continue
        w = []
        for r, lp, lq_ref, lq_prop in zip(g.reward, g.logp_ref, g.logq_ref, g.logq_proposal):
            mu = (1 - lam) * math.exp(lq_ref) + lam * math.exp(lq_prop)
            w.append(math.exp(beta * r) * math.exp(lp) / mu / math.exp(log_z[pid]))
        mean = sum(w) / len(w)
        m2[pid] = m2.get(pid, 0.0) + frac[comp] * sum(x * x for x in w) / len(w)
        var[pid] = var.get(pid, 0.0) + frac[comp] * sum((x - mean) ** 2 for x in w) / (len(w) - 1)
    return {pid: (1 / m2[pid], 1 / (1 + var[pid])) for pid in m2}


def _reference_table(scores, log_p_correct, K, beta, lam):
    """The study's rows of one (K, β, λ), sample by sample."""
    k_ref, k_prop = _split(K, lam)
    lam_eff = k_prop / K
    counts = scores.groupby(["component", "prompt_id"]).size()
    R = min(counts[c].min() // K for c, kc in (("ref", k_ref), ("proposal", k_prop)) if kc > 0)
    binary = set(scores.reward) <= {0.0, 1.0} and np.allclose(scores.logq_ref, scores.logp_ref)
    log_z = {
        pid: math.log(1 + math.exp(lp) * math.expm1(beta)) for pid, lp in log_p_correct.items()
    }
    ess = _reference_ess(scores, beta, lam_eff, log_z)
    sample = {(s.prompt_id, s.component, s.sample_idx): s for s in scores.itertuples()}
    rows = []
    for pid in sorted(set(scores.prompt_id)):
        P = math.exp(log_p_correct[pid])
        if lam_eff == 0 and binary:
            f = (1 - P + P * math.exp(beta)) ** 2 / (1 - P + P * math.exp(2 * beta))
            f_pop = f_strat = f
            # exact moments of log Ẑ = log(1 + C(e^β − 1)/K), C ~ Binomial(K, P)
            pmf = [math.comb(K, c) * P**c * (1 - P) ** (K - c) for c in range(K + 1)]
            vals = [math.log(1 + c * math.expm1(beta) / K) for c in range(K + 1)]
            m1 = sum(p * v for p, v in zip(pmf, vals))
            exact = (m1 - log_z[pid], sum(p * (v - m1) ** 2 for p, v in zip(pmf, vals)))
        else:
            f_pop, f_strat = ess[pid]
            exact = (math.nan, math.nan)
        for r in range(R):
            log_w, rewarded = [], 0
            for comp, kc in (("ref", k_ref), ("proposal", k_prop)):
                for j in range(r * K, r * K + kc):
                    s = sample[pid, comp, j]
                    mu = (1 - lam_eff) * math.exp(s.logq_ref) + lam_eff * math.exp(s.logq_proposal)
                    log_w.append(beta * s.reward + s.logp_ref - math.log(mu))
                    rewarded += s.reward > 0
            w = [math.exp(x) for x in log_w]
            lzh = math.log(sum(w) / K)
            ess_s = sum(w) ** 2 / sum(x * x for x in w)
            fs = min(ess_s / K, 1.0)
            se = math.sqrt((1 / fs - 1) / K)
            err = lzh - log_z[pid]
            rows.append(
                {
                    "prompt_id": pid,
                    "K": K,
                    "beta": beta,
                    "strength": lam,
                    "strength_effective": lam_eff,
                    "replicate": r,
                    "log_z_hat": lzh,
                    "log_z": log_z[pid],
                    "error": err,
                    "ess": ess_s,
                    "ess_frac": ess_s / K,
                    "max_weight": max(w) / sum(w),
                    "se": se,
                    "bias_delta": -0.5 * (1 / fs - 1) / K,
                    "covered": abs(err) <= 2 * se,
                    "n_rewarded": rewarded,
                    "ess_frac_pop": f_pop,
                    "ess_frac_strat": f_strat,
                    "pred_bias": -0.5 * (1 / f_strat - 1) / K,
                    "pred_var": (1 / f_strat - 1) / K,
                    "pred_var_iid": (1 / f_pop - 1) / K,
                    "exact_bias": exact[0],
                    "exact_var": exact[1],
                }
            )
    return pd.DataFrame(rows)


def _assert_frames_close(got, want):
    assert got.columns.tolist() == want.columns.tolist()
    assert len(got) == len(want)
    for col in want:
        g, w = got[col].tolist(), want[col].tolist()
        if want[col].dtype.kind in "fc":
            # se = √(1/ess_frac − 1)/√K: at equal weights √(rounding) ~ 1e-8, not 0
            atol = 1e-7 if col == "se" else 1e-12
            assert np.allclose(g, w, rtol=1e-9, atol=atol, equal_nan=True), col
        else:
            assert g == w, col


@pytest.mark.parametrize(("reward_scale", "tempered"), [(1.0, False), (0.5, False), (1.0, True)])
def test_bias_variance_table_against_a_sample_by_sample_reference(reward_scale, tempered):
    """Every column of the study's table, recomputed by loops over the cached samples: K = 1
    (one sample a replicate), λ that rounds to 0 or 1 at small K, a non-binary reward and a
    π_ref proposal that is not π_ref itself (no exact plain-MC values for either)."""
    scores = _scores(7, prompts=("a", "b", "z"), seed=3)
    scores.loc[scores.prompt_id == "z", "reward"] = 0.0  # a prompt nothing solves: P = 0
    # indexed by prompt id, in no particular order
    log_p_correct = pd.concat([pd.Series([-np.inf], index=["z"]), LOG_P_CORRECT])
    scores["reward"] *= reward_scale
    if tempered:
        scores["logq_ref"] = scores.logp_ref * 0.9
    K, beta, lam = [1, 3], [0.5, 2.0], [0.0, 0.3, 1.0]
    table, skipped = studies.bias_variance_table(
        scores, log_p_correct, K=K, beta=beta, strength=lam
    )
    assert skipped == []
    want = pd.concat(
        [_reference_table(scores, log_p_correct, k, b, x) for x in lam for k in K for b in beta],
        ignore_index=True,
    )
    _assert_frames_close(table, want)
    assert table.index.tolist() == list(range(len(table)))
    assert want.covered.any() and not want.covered.all()
    assert (want.n_rewarded == 0).any() and (want.n_rewarded > 1).any()


def test_summarize_bias_variance_by_hand():
    """The per-(K, β, λ) summary of a small hand-built table, group by group with loops."""
    rng = np.random.default_rng(5)
    rows = []
    for K, lam in ((4, 0.5), (2, 0.0)):  # out of order: the summary sorts
        for pid in ("q", "p"):
            for r in range(3):
                rows.append(
                    {
                        "prompt_id": pid,
                        "K": K,
                        "beta": 1.0,
                        "strength": lam,
                        "strength_effective": lam,
                        "replicate": r,
                        "log_z": 0.4 if pid == "p" else 0.9,
                        "log_z_hat": rng.normal(0.5, 0.3),
                        "se": rng.uniform(0.05, 0.3),
                        "bias_delta": rng.uniform(-0.1, 0),
                        "covered": bool(rng.random() < 0.6),
                        "n_rewarded": int(rng.integers(0, 3)),
                        "ess_frac": rng.uniform(0.2, 1),
                        "ess_frac_pop": rng.uniform(0.2, 1),
                        "ess_frac_strat": rng.uniform(0.2, 1),
                        "pred_bias": rng.uniform(-0.2, 0),
                        "pred_var": rng.uniform(0, 0.2),
                        "pred_var_iid": rng.uniform(0, 0.3),
                        "exact_bias": rng.normal() if lam == 0 else np.nan,
                        "exact_var": rng.uniform() if lam == 0 else np.nan,
                    }
                )
    table = pd.DataFrame(rows)
    table["error"] = table.log_z_hat - table.log_z
    table.loc[0, "n_rewarded"] = 0
    agg = studies.summarize_bias_variance(table)
    assert agg.columns.tolist()[:4] == ["K", "beta", "strength", "strength_effective"]
    assert agg.columns.tolist()[4:] == [
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
    assert agg.K.tolist() == [2, 4] and agg.index.tolist() == [0, 1]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs)

    def var1(xs):
        xs = list(xs)
        m = mean(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    for i, K in enumerate((2, 4)):
        g = [
            r | {"error": r["log_z_hat"] - r["log_z"]}
            for r in table.to_dict("records")
            if r["K"] == K
        ]
        a = agg.iloc[i]
        assert (a.prompts, a.replicates) == (2, 3)
        e = [r["error"] for r in g]
        assert a.bias == pytest.approx(mean(e), rel=1e-12)
        assert a.bias_se == pytest.approx(math.sqrt(var1(e) / len(e)), rel=1e-12)
        assert a.mse == pytest.approx(mean(x * x for x in e), rel=1e-12)
        per_prompt = [var1(r["log_z_hat"] for r in g if r["prompt_id"] == p) for p in ("p", "q")]
        assert a["var"] == pytest.approx(mean(per_prompt), rel=1e-12)
        assert a.pred_mse == pytest.approx(
            mean(r["pred_bias"] ** 2 + r["pred_var"] for r in g), rel=1e-12
        )
        assert a.plugin_var == pytest.approx(mean(r["se"] ** 2 for r in g), rel=1e-12)
        assert a.plugin_bias == pytest.approx(mean(r["bias_delta"] for r in g), rel=1e-12)
        assert a.coverage == pytest.approx(mean(r["covered"] for r in g), rel=1e-12)
        assert a.no_reward == pytest.approx(mean(r["n_rewarded"] == 0 for r in g), rel=1e-12)
        assert a.mean_log_z == pytest.approx(0.65, rel=1e-12)
        for col in (
            "pred_bias",
            "pred_var",
            "pred_var_iid",
            "ess_frac",
            "ess_frac_pop",
            "ess_frac_strat",
        ):
            assert a[col] == pytest.approx(mean(r[col] for r in g), rel=1e-12), col
        if K == 2:
            assert a.exact_bias == pytest.approx(mean(r["exact_bias"] for r in g), rel=1e-12)
            assert a.exact_var == pytest.approx(mean(r["exact_var"] for r in g), rel=1e-12)
        else:
            assert math.isnan(a.exact_bias) and math.isnan(a.exact_var)


def test_population_ess_by_hand():
    """ess_frac_pop and ess_frac_strat from every cached sample, by loops; only the
    components that λ samples count (a prompt seen only in the other one is absent)."""
    scores = _scores(5, prompts=("a", "b"), seed=2)
    extra = _scores(5, prompts=("c", "d"), seed=4)  # c: proposal samples only, d: ref only
    keep = ((extra.prompt_id == "c") & (extra.component == "proposal")) | (
        (extra.prompt_id == "d") & (extra.component == "ref")
    )
    scores = pd.concat([scores, extra[keep]], ignore_index=True)
    log_z = pd.Series([0.3, 0.8, 0.5, 0.1], index=["a", "b", "c", "d"])
    for lam, prompts in (
        (0.0, ["a", "b", "d"]),
        (0.4, ["a", "b", "c", "d"]),
        (1.0, ["a", "b", "c"]),
    ):
        got = studies.population_ess(scores, 1.5, lam, log_z)
        assert got.index.tolist() == prompts and got.columns.tolist() == [
            "ess_frac_pop",
            "ess_frac_strat",
        ]
        want = _reference_ess(scores, 1.5, lam, log_z.to_dict())
        for pid in prompts:
            assert got.loc[pid].tolist() == pytest.approx(list(want[pid]), rel=1e-12), (lam, pid)


def test_replicate_blocks_edges():
    scores = _scores(20, prompts=("a", "b"))
    # b has fewer ref samples: the fewest over prompts bound R; 20 // 8 = 2 blocks, not 2.5
    scores = scores[
        ~((scores.prompt_id == "b") & (scores.component == "ref") & (scores.sample_idx >= 18))
    ]
    shuffled = scores.sample(frac=1.0, random_state=0)
    rows, lam, R = studies.replicate_blocks(shuffled, 8, 0.25)
    assert (lam, R) == (0.25, 2) and type(R) is int
    assert rows.index.tolist() == list(range(len(rows)))
    assert rows.columns.tolist() == [*scores.columns, "replicate"]
    want = [
        (pid, r, comp, j)
        for pid in ("a", "b")
        for r in range(2)
        for comp, kc in (("proposal", 2), ("ref", 6))
        for j in range(8 * r, 8 * r + kc)
    ]
    assert list(zip(rows.prompt_id, rows.replicate, rows.component, rows.sample_idx)) == want
    assert rows.replicate.dtype.kind == "i"
    assert studies.replicate_blocks(scores, 9, 0.0)[2] == 2  # 18 // 9, ref only
    assert studies.replicate_blocks(scores, 8, 0.25, max_replicates=5)[2] == 2
    # λ = 0 needs no proposal at all, not even its log-density column
    ref_only = scores[scores.component == "ref"].drop(columns="logq_proposal")
    rows0, lam0, R0 = studies.replicate_blocks(ref_only, 4, 0.0)
    assert (lam0, R0, len(rows0)) == (0.0, 4, 2 * 4 * 4)
    table, _ = studies.bias_variance_table(
        ref_only, LOG_P_CORRECT, K=[4], beta=[1.0], strength=[0.0]
    )
    assert len(table) == 2 * 4
    # but any λ that rounds to one proposal sample does
    with pytest.raises(
        ValueError,
        match=r"^strength λ=0\.125 needs samples from the \['proposal'\] component\(s\), "
        r"which the rollout cache lacks \(it has \['ref'\]\); use proposal=mixture, or λ=0 only$",
    ):
        studies.replicate_blocks(ref_only, 8, 0.125)


def test_bias_variance_table_options_and_errors():
    scores = _scores(16)
    table, skipped = studies.bias_variance_table(
        scores,
        LOG_P_CORRECT,
        K=[8, 4],
        beta=[1.0],
        strength=[0.5],
        max_replicates=3,
        min_replicates=3,
    )
    assert skipped == [(8, 0.5)]  # 2 blocks < 3; the next K still runs
    assert sorted(set(table.replicate)) == [0, 1, 2] and set(table.K) == {4}
    one, skipped = studies.bias_variance_table(
        scores, LOG_P_CORRECT, K=[16], beta=[1.0], strength=[0.5], min_replicates=1
    )
    assert skipped == [] and len(one) == 2
    bad = scores.copy()
    bad.loc[3, "logp_ref"] = np.nan
    with pytest.raises(
        ValueError, match=r"^non-finite logp_ref for 1 trajectories \(prompt ids \['a'\]\)"
    ):
        studies.bias_variance_table(bad, LOG_P_CORRECT, K=[4], beta=[1.0], strength=[0.0])
    with pytest.raises(
        ValueError,
        match=r"^no \(K, λ\) setting has 2 disjoint replicates in the rollout cache \(samples per prompt "
        r"and component: \{'proposal': 16, 'ref': 16\}\); lower study\.K or raise proposal\.num_samples$",
    ):
        studies.bias_variance_table(scores, LOG_P_CORRECT, K=[9], beta=[1.0], strength=[0.5])
