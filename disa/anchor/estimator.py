"""The importance-sampling estimator of ``log Z`` and the stratified mixture design.

Pure functions over one prompt's K samples (``log_weights``, ``log_z_hat``,
``is_diagnostics``) and over the scores table (``mixture_log_density``, ``split_counts``,
``select_trajectories``); see :mod:`disa.anchor` for the math.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from disa.anchor.theory import predicted_bias, predicted_var


def log_weights(
    reward: np.ndarray, logp_ref: np.ndarray, log_mu: np.ndarray, beta: float
) -> np.ndarray:
    """``β r + log π_ref − log μ`` per sample. All arrays ``[K]``."""
    return (
        beta * np.asarray(reward, np.float64)
        + np.asarray(logp_ref, np.float64)
        - np.asarray(log_mu, np.float64)
    )


def log_z_hat(log_w: np.ndarray) -> float:
    """``log((1/K) Σ_k exp(log w_k))`` computed in log space."""
    log_w = np.asarray(log_w, np.float64)
    m = log_w.max()
    return float(m + np.log(np.exp(log_w - m).sum()) - np.log(len(log_w)))


def is_diagnostics(log_w: np.ndarray) -> dict[str, float]:
    """Kish ESS and the delta-method bias and standard error of ``log Ẑ`` at the sample
    ESS fraction (:func:`~disa.anchor.theory.predicted_bias`, ``predicted_var``).

    >>> d = is_diagnostics(np.log([1.0, 1.0, 1.0, 1.0]))
    >>> d["ess"], d["bias"], d["se"]
    (4.0, 0.0, 0.0)
    """
    log_w = np.asarray(log_w, np.float64)
    K = len(log_w)
    w = np.exp(log_w - log_w.max())  # scale-free: ESS and normalised weights ignore the max
    ess = float(w.sum() ** 2 / (w**2).sum())
    frac = min(ess / K, 1.0)  # rounding can make ESS a hair above K: 1/frac − 1 stays ≥ 0
    return {
        "K": K,
        "ess": ess,
        "ess_frac": ess / K,
        "max_weight": float(w.max() / w.sum()),
        "bias": float(predicted_bias(K, frac)) + 0.0,  # + 0.0: no −0.0 at equal weights
        "se": math.sqrt(predicted_var(K, frac)),
    }


def mixture_log_density(
    logq_ref: np.ndarray, logq_prop: np.ndarray | None, strength: float
) -> np.ndarray:
    """``log((1−λ)·q_ref + λ·q_prop)`` in log space; λ ∈ {0, 1} needs only one component."""
    if strength == 0.0:
        return np.asarray(logq_ref, np.float64)
    if strength == 1.0:
        return np.asarray(logq_prop, np.float64)
    return np.logaddexp(
        math.log1p(-strength) + np.asarray(logq_ref, np.float64),
        math.log(strength) + np.asarray(logq_prop, np.float64),
    )


def split_counts(K: int, strength: float) -> tuple[int, int]:
    """``(K_ref, K_prop)``: how many of the K samples come from each mixture component."""
    k_prop = int(round(strength * K))
    return K - k_prop, k_prop


def select_trajectories(
    scores: pd.DataFrame, K: int, strength: float
) -> tuple[pd.DataFrame, float]:
    """The K trajectories per prompt that the anchor (and DISA training) use, and ``λ_eff``.

    ``scores`` holds ``K_max`` samples per prompt from each component it was sampled from
    (column ``component`` ∈ {"ref", "proposal"}, ``sample_idx`` 0..K_max−1).
    """
    k_ref, k_prop = split_counts(K, strength)
    # the fewest samples any prompt has from each component (a partial cache must not
    # silently anchor some prompts on fewer than K samples)
    avail = scores.groupby(["component", "prompt_id"]).size().groupby(level=0).min().to_dict()
    for comp, need in (("ref", k_ref), ("proposal", k_prop)):
        if need > avail.get(comp, 0):
            raise ValueError(
                f"proposal.num_samples={K} with proposal.strength={strength} needs {need} samples "
                f"per prompt from the {comp!r} component, but the rollout cache has {avail.get(comp, 0)}"
            )
    keep = ((scores.component == "ref") & (scores.sample_idx < k_ref)) | (
        (scores.component == "proposal") & (scores.sample_idx < k_prop)
    )
    return scores[keep].reset_index(drop=True), k_prop / K
