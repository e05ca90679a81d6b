"""Offline importance-sampled anchoring: the frozen ``prompt → log Ẑ`` table.

For a prompt ``q`` with proposal samples ``o_1..o_K ~ μ``::

    log w_k   = β r_k + log π_ref(o_k|q) − log μ(o_k|q)
    log Ẑ(q)  = logsumexp_k(log w_k) − log K            (never exponentiate first)

Ẑ is unbiased for Z, but ``E[log Ẑ] ≤ log Z`` (Jensen). With Kish's ``ESS = (Σw)²/Σw²``
the delta method gives ``bias ≈ −(K/ESS − 1)/(2K)`` and ``sd ≈ sqrt((K/ESS − 1)/K)``.

The defensive mixture ``μ_λ = (1−λ)π_ref + λπ_prop`` is sampled deterministically:
``round(λK)`` samples from the proposal model and the rest from π_ref, every sample scored
under both. Using the *realised* fraction ``λ_eff = round(λK)/K`` in the density is the
balance-heuristic multiple-importance-sampling estimator, which is exactly unbiased for Z
with this stratified allocation (using λ itself would not be when λK is not an integer).

Modules:

- :mod:`disa.anchor.estimator`: the IS estimator (``log_weights``, ``log_z_hat``,
  ``is_diagnostics``) and the stratified mixture design (``mixture_log_density``,
  ``split_counts``, ``select_trajectories``);
- :mod:`disa.anchor.theory`: the exact ``log Z`` of a binary reward and its inverse, the
  delta-method and exact finite-K bias and variance of ``log Ẑ``;
- :mod:`disa.anchor.table`: the anchor table (``build_anchor``, ``check_finite``,
  ``anchor_summary``).

The package imports nothing else from :mod:`disa`.
"""

from disa.anchor.estimator import (
    is_diagnostics,
    log_weights,
    log_z_hat,
    mixture_log_density,
    select_trajectories,
    split_counts,
)
from disa.anchor.table import SCORE_COLUMNS, anchor_summary, build_anchor, check_finite
from disa.anchor.theory import (
    binary_ess_frac,
    binary_mc_moments,
    exact_log_z,
    p_correct_from_log_z,
    predicted_bias,
    predicted_mse,
    predicted_var,
)

__all__ = [
    "SCORE_COLUMNS",
    "anchor_summary",
    "binary_ess_frac",
    "binary_mc_moments",
    "build_anchor",
    "check_finite",
    "exact_log_z",
    "is_diagnostics",
    "log_weights",
    "log_z_hat",
    "mixture_log_density",
    "p_correct_from_log_z",
    "predicted_bias",
    "predicted_mse",
    "predicted_var",
    "select_trajectories",
    "split_counts",
]
