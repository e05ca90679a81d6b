"""Theory of the estimator ``log Ẑ``: the exact ``log Z`` of a binary reward, and the bias and
variance of ``log Ẑ`` (delta method from the ESS; exact finite-K sums for plain Monte Carlo).

The one home of these formulas: the anchor's per-prompt diagnostics, the bias-variance
study and the evaluation's target distances all call them.
"""

from __future__ import annotations

import math

import numpy as np

# -- the exact log Z of a binary reward ------------------------------------------------------
#
# With r ∈ {0, 1} and P = P_ref(correct|q), Z = E_{π_ref}[e^{βr}] = 1 + P(e^β − 1), so
# log Z ∈ [0, β]. Both directions are computed in log space: accurate for P → 0 (relative)
# and P → 1 alike, with no log(0) and no overflow for large β.


def _log_expm1(x: np.ndarray | float) -> np.ndarray:
    """``log(e^x − 1)`` for x ≥ 0 (−inf at 0), without overflow for large x."""
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        return x + np.log(-np.expm1(-x))


def exact_log_z(log_p_correct: np.ndarray | float, beta: float) -> np.ndarray:
    """Exact ``log Z = log(1 + P(e^β − 1))`` for a binary reward, from ``log P_ref(correct)``.

    >>> float(exact_log_z(0.0, 2.0)), float(exact_log_z(-np.inf, 2.0))
    (2.0, 0.0)
    """
    lp = np.minimum(np.asarray(log_p_correct, np.float64), 0.0)
    return np.logaddexp(0.0, lp + _log_expm1(beta))  # softplus(log P + log(e^β − 1))


def p_correct_from_log_z(log_z: np.ndarray | float, beta: float) -> np.ndarray:
    """``P_ref(correct) = (e^{log Z} − 1)/(e^β − 1)``, the inverse of :func:`exact_log_z`,
    clipped to [0, 1] (``log Z`` is clipped to [0, β] first).

    >>> float(p_correct_from_log_z(exact_log_z(np.log(0.25), 3.0), 3.0))
    0.25
    """
    lz = np.clip(np.asarray(log_z, np.float64), 0.0, beta)
    return np.clip(np.exp(_log_expm1(lz) - _log_expm1(beta)), 0.0, 1.0)


# -- bias and variance of log Ẑ ---------------------------------------------------------------
#
# With i.i.d. samples from μ and weights w = π_ref e^{βr}/μ, Ẑ = mean(w) has E Ẑ = Z and
# Var(Ẑ)/Z² = (E_μ[w²]/Z² − 1)/K. Writing ess_frac = Z²/E_μ[w²] (the population value of
# Kish's ESS/K), the delta method gives for log Ẑ
#     Var(log Ẑ) ≈ (1/ess_frac − 1)/K,     E[log Ẑ] − log Z ≈ −Var(log Ẑ)/2,
# the two approximations the anchor table reports per prompt with the sample ESS.


def predicted_var(K: np.ndarray | float, ess_frac: np.ndarray | float) -> np.ndarray:
    """Delta-method variance of ``log Ẑ`` from K samples: ``(1/ess_frac − 1)/K``.

    >>> float(predicted_var(10, 0.5))
    0.1
    """
    return (1.0 / np.asarray(ess_frac, np.float64) - 1.0) / np.asarray(K, np.float64)


def predicted_bias(K: np.ndarray | float, ess_frac: np.ndarray | float) -> np.ndarray:
    """Delta-method bias of ``log Ẑ`` (Jensen, always ≤ 0): ``−(1/ess_frac − 1)/(2K)``."""
    return -0.5 * predicted_var(K, ess_frac)


def predicted_mse(K: np.ndarray | float, ess_frac: np.ndarray | float) -> np.ndarray:
    """``bias² + variance`` of ``log Ẑ`` under the delta method."""
    return predicted_bias(K, ess_frac) ** 2 + predicted_var(K, ess_frac)


def binary_ess_frac(p_correct: np.ndarray | float, beta: np.ndarray | float) -> np.ndarray:
    """Population ESS/K of plain Monte Carlo (μ = π_ref) with a binary reward.

    The weights are ``e^{βr}`` with ``r ~ Bernoulli(P)``, so ``E w = 1 + P(e^β − 1)`` and
    ``E w² = 1 + P(e^{2β} − 1)``, and ``ESS/K → (E w)²/E w²``. It is 1 at P ∈ {0, 1} and
    smallest near ``P = 1/(e^β + 1)``, where it equals ``4e^β/(e^β + 1)²``.
    """
    p = np.asarray(p_correct, np.float64)
    b = np.asarray(beta, np.float64)
    return (1.0 + p * np.expm1(b)) ** 2 / (1.0 + p * np.expm1(2.0 * b))


def binary_mc_moments(K: int, p_correct: float, beta: float) -> tuple[float, float]:
    """Exact ``(bias, variance)`` of ``log Ẑ`` for plain Monte Carlo with a binary reward.

    With C ~ Binomial(K, P) rewarded samples, ``Ẑ = 1 + C(e^β − 1)/K``: a finite sum over
    C, exact at any K (the delta method is its large-K limit).
    """
    K, p = int(K), float(p_correct)
    c = np.arange(K + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0·log 0 = 0 at P ∈ {0, 1}
        log_p = np.log(p)
        log_pmf = (
            math.lgamma(K + 1)
            - np.array([math.lgamma(x + 1) + math.lgamma(K - x + 1) for x in c])
            + np.where(c > 0, c * log_p, 0.0)
            + np.where(c < K, (K - c) * np.log1p(-p), 0.0)
        )
    pmf = np.exp(log_pmf)
    values = np.log1p(c * math.expm1(beta) / K)
    mean = float(pmf @ values)
    return mean - float(exact_log_z(log_p, beta)), float(pmf @ (values - mean) ** 2)
