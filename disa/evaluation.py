"""Evaluation metrics: Mean@k, unbiased pass@k, diversity, exact distance to the target.

All functions are pure (DataFrames / arrays in, numbers out); the evaluate stage
(:mod:`disa.stages.evaluate`) does the sampling and caching.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from disa.anchor.theory import exact_log_z


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct:
    ``1 − C(n−c, k) / C(n, k)``, as a stable product (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def distinct_n(texts: Iterable[str], n: int, unit: str = "word") -> float:
    """Distinct n-grams / all n-grams over ``texts`` (``unit`` "word" or "char")."""
    if unit not in ("word", "char"):
        raise ValueError(f"distinct_n unit must be 'word' or 'char', got {unit!r}")
    grams: list[tuple] = []
    for t in texts:
        toks = t.split() if unit == "word" else list(t)
        grams += [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def sample_metrics(
    samples: pd.DataFrame, ks: Sequence[int], set_sizes: pd.Series | None = None
) -> dict[str, float]:
    """Metrics from ``samples`` (columns ``prompt_id, text, reward``; k rows per prompt).

    - ``mean_at_k``: mean reward over all samples (Mean@k);
    - ``pass_at_{j}``: unbiased pass@j averaged over prompts, for each ``j ≤ k``;
    - ``unique_correct``: distinct correct completions per *solved* prompt;
    - ``coverage``: distinct correct / size of the rewarded set, averaged over prompts
      (needs ``set_sizes``, indexed by prompt id);
    - ``distinct_2``: character distinct-2 over all completions.

    The per-prompt figures are :func:`sample_metrics_per_prompt`'s, averaged over prompts.
    """
    per = sample_metrics_per_prompt(samples, ks, set_sizes)
    out = {
        "mean_at_k": float(samples.reward.mean()),
        "k": int(samples.groupby("prompt_id", sort=False).size().min()),
    }
    out |= {f"pass_at_{j}": float(per[f"pass_at_{j}"].mean()) for j in ks if f"pass_at_{j}" in per}
    out["solved_frac"] = float(per.solved.mean())
    # no solved prompt means no unique-correct figure, not a zero: leave it out of the result
    if per.unique_correct.notna().any():
        out["unique_correct"] = float(per.unique_correct.mean())
    if set_sizes is not None:
        out["coverage"] = float(per.coverage.mean())
    out["distinct_2"] = distinct_n(samples.text, 2, unit="char")
    return out


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 − e^x) for x ≤ 0."""
    x = np.minimum(np.asarray(x, np.float64), -1e-300)
    # np.where evaluates both branches; the unused one may be log 0
    with np.errstate(divide="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def sample_metrics_per_prompt(
    samples: pd.DataFrame, ks: Sequence[int], set_sizes: pd.Series | None = None
) -> pd.DataFrame:
    """The sample metrics of :func:`sample_metrics` prompt by prompt: one row per prompt
    (``prompt_id``, ``mean_at_k``, ``pass_at_{j}``, ``solved``, ``unique_correct``, which is
    missing where the prompt has no correct sample, and ``coverage`` with ``set_sizes``).
    What paired comparisons of two policies resample (:func:`disa.analysis.stats.paired_differences`)."""
    per = samples.groupby("prompt_id", sort=False)
    n = int(per.size().min())
    mean = per.reward.mean()  # in the groups' order, as the loops below
    out = pd.DataFrame({"prompt_id": mean.index, "mean_at_k": mean.to_numpy()})
    for j in ks:
        if j <= n:
            out[f"pass_at_{j}"] = [pass_at_k(len(g), int((g.reward > 0).sum()), j) for _, g in per]
    uniq = (
        samples[samples.reward > 0]
        .groupby("prompt_id")
        .text.nunique()
        .reindex(out.prompt_id, fill_value=0)
    )
    out["solved"] = (uniq.to_numpy() > 0).astype(float)
    out["unique_correct"] = uniq.where(uniq > 0).to_numpy(dtype=float)
    if set_sizes is not None:
        out["coverage"] = (uniq / set_sizes.reindex(uniq.index)).to_numpy(dtype=float)
    return out


def target_distances_per_prompt(
    policy: pd.DataFrame, ref: pd.DataFrame, beta: float
) -> pd.DataFrame:
    """:func:`target_distances` prompt by prompt: one row per prompt (``prompt_id`` and the
    metrics), before the average over prompts."""
    m = ref.merge(
        policy, on=["prompt_id", "answer"], suffixes=("_ref", "_pol"), validate="one_to_one"
    )
    if len(m) != len(ref) or len(m) != len(policy):
        raise ValueError("policy and reference rewarded-set tables do not cover the same answers")
    rows = []
    for prompt_id, g in m.groupby("prompt_id", sort=False):
        lr, lp = g.logp_ref.to_numpy(np.float64), g.logp_pol.to_numpy(np.float64)
        log_pr, log_pp = np.logaddexp.reduce(lr), np.logaddexp.reduce(lp)
        log_rest_r, log_rest_p = _log1mexp(log_pr), _log1mexp(log_pp)
        log_z = exact_log_z(log_pr, beta)
        target = np.append(lr + beta - log_z, log_rest_r - log_z)  # log p* on the partition
        pol = np.append(lp, log_rest_p)
        tc, pc = lr - log_pr, lp - log_pp  # conditional on R
        rows.append(
            {
                "prompt_id": prompt_id,
                "tv_target": 0.5 * np.abs(np.exp(target) - np.exp(pol)).sum(),
                "kl_target": float(np.sum(np.exp(target) * (target - pol))),
                "tv_rewarded": 0.5 * np.abs(np.exp(tc) - np.exp(pc)).sum(),
                "kl_rewarded": float(np.sum(np.exp(tc) * (tc - pc))),
                "p_correct_exact": float(np.exp(log_pp)),
                "p_correct_target": float(
                    np.exp(log_pr + beta - log_z)
                ),  # what matching p* exactly would give
            }
        )
    return pd.DataFrame(rows)


def target_distances(policy: pd.DataFrame, ref: pd.DataFrame, beta: float) -> dict[str, float]:
    """Exact distances between the policy and ``p* ∝ π_ref·exp(β r)``, averaged over prompts.

    ``policy`` and ``ref``: columns ``prompt_id, answer, logp`` over the whole rewarded set.
    Two views, both exact:

    - ``tv_target``/``kl_target``: on the partition {each rewarded answer} ∪ {everything
      else}, where ``p*(o) = π_ref(o)e^β/Z`` and ``p*(rest) = (1 − P_ref)/Z``. This is a
      lower bound on the distance over all strings and catches both too little and too much
      probability on the rewarded set;
    - ``tv_rewarded``/``kl_rewarded``: between the distributions conditioned on being
      correct, ``p*(o | R) = π_ref(o)/P_ref(R)``, which isolates diversity among correct
      answers (mode collapse shows up here).

    KL is ``KL(p* ‖ π)`` (mass-covering: large when the policy drops answers p* keeps).
    ``p_correct_exact`` is the policy's probability of a correct answer, ``p_correct_target``
    the target's (``P_ref e^β / Z``), the value a policy that matches ``p*`` reaches.
    """
    per_prompt = target_distances_per_prompt(policy, ref, beta).drop(columns="prompt_id")
    return {k: float(v) for k, v in per_prompt.mean().items()}


def per_prompt_metrics(
    samples: pd.DataFrame,
    pass_k: Sequence[int],
    beta: float,
    rewarded: pd.DataFrame | None = None,
    ref_rewarded: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per evaluated prompt: the sample metrics (:func:`sample_metrics_per_prompt`,
    over the graded samples) and, on an enumerable task, the exact ones
    (:func:`target_distances_per_prompt`). Their mean over prompts is what
    :func:`policy_metrics` reports for the exact metrics, Mean@k where every prompt has k
    graded samples, and pass@k and coverage always."""
    graded = samples[samples.reward.notna()]
    sizes = ref_rewarded.groupby("prompt_id").size() if ref_rewarded is not None else None
    out = sample_metrics_per_prompt(graded, list(pass_k), sizes)
    if rewarded is not None and ref_rewarded is not None:
        ids = set(samples.prompt_id)
        exact = target_distances_per_prompt(
            rewarded[rewarded.prompt_id.isin(ids)],
            ref_rewarded[ref_rewarded.prompt_id.isin(ids)],
            float(beta),
        )
        out = out.merge(exact, on="prompt_id", how="outer", validate="one_to_one")
    return out


def policy_metrics(
    samples: pd.DataFrame,
    pass_k: Sequence[int],
    beta: float,
    rewarded: pd.DataFrame | None = None,
    ref_rewarded: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Every evaluation metric of one policy from its ``samples`` (columns ``prompt_id, text,
    reward, n_tokens``, optionally ``benchmark``).

    Samples whose grading failed (NaN reward) are left out and counted in
    ``reward_missing``; when samples carry a ``benchmark`` column, every metric is also reported
    per benchmark (``{benchmark}.{metric}``) and macro-averaged (``macro.{metric}``), for one
    benchmark as for several. On an enumerable task,
    ``ref_rewarded`` (π_ref's rewarded-set log-probs) gives the set sizes for ``coverage``,
    and with the policy's own ``rewarded`` table the exact distances to p*
    (:func:`target_distances`), over the evaluated prompts.
    """
    missing = samples.reward.isna()
    graded = samples[~missing]
    if graded.empty:
        where = (
            f" of benchmarks {sorted(samples.benchmark.unique())}" if "benchmark" in samples else ""
        )
        raise ValueError(
            f"every evaluation sample ({len(samples)}{where}) failed grading: the grader returned no "
            "reward for any; see the grading errors logged above (the sandbox, a canonical solution, "
            "a math-verify timeout) and the grader settings (task.grader)"
        )
    sizes = ref_rewarded.groupby("prompt_id").size() if ref_rewarded is not None else None
    m = sample_metrics(graded, list(pass_k), sizes)
    if "benchmark" in graded:  # even for one benchmark: a sweep's tables keep one schema
        per = {b: sample_metrics(g, list(pass_k)) for b, g in graded.groupby("benchmark")}
        for b, mb in per.items():
            m |= {f"{b}.{k}": v for k, v in mb.items()}
        # a benchmark none of whose samples was graded has no metrics, but its count is there,
        # and no macro average silently leaves it out
        for b, n in samples.reward.isna().groupby(samples.benchmark).sum().items():
            m[f"{b}.reward_missing"] = int(n)
        everyone = len(per) == samples.benchmark.nunique()
        for k in ("mean_at_k", *(f"pass_at_{j}" for j in pass_k)):
            vals = [mb[k] for mb in per.values() if k in mb]
            if everyone and len(vals) == len(per):
                m[f"macro.{k}"] = float(sum(vals) / len(vals))
    if rewarded is not None and ref_rewarded is not None:
        ids = set(samples.prompt_id)
        m |= target_distances(
            rewarded[rewarded.prompt_id.isin(ids)],
            ref_rewarded[ref_rewarded.prompt_id.isin(ids)],
            float(beta),
        )
    m["tokens_generated"] = int(samples.n_tokens.sum())
    m["reward_missing"] = int(missing.sum())
    return m
