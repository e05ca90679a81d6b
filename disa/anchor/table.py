"""The frozen anchor table: one row per prompt with ``log_z_hat`` and its diagnostics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from disa.anchor.estimator import (
    is_diagnostics,
    log_weights,
    log_z_hat,
    mixture_log_density,
    select_trajectories,
)
from disa.anchor.theory import exact_log_z

#: the columns of the scores table the anchor reads (token lists stay on disk)
SCORE_COLUMNS = (
    "prompt_id",
    "component",
    "sample_idx",
    "reward",
    "logp_ref",
    "logq_ref",
    "logq_proposal",
)


def check_finite(df: pd.DataFrame, columns: list[str]) -> None:
    """Refuse NaN or infinite values, naming the column and the first prompt ids."""
    for col in columns:
        bad = ~np.isfinite(df[col].to_numpy(np.float64))
        if bad.any():
            ids = df.prompt_id[bad].unique()[:5].tolist()
            raise ValueError(
                f"non-finite {col} for {int(bad.sum())} trajectories (prompt ids {ids}); "
                "refusing to anchor on them"
            )


def build_anchor(
    scores: pd.DataFrame,
    *,
    beta: float,
    K: int,
    strength: float,
    min_ess: float = 2.0,
    log_p_correct: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per prompt: ``log_z_hat`` and its diagnostics (and the exact ``log_z`` when
    ``log_p_correct``, indexed by prompt id, is given).

    ``scores`` columns: :data:`SCORE_COLUMNS` (``logq_proposal`` may be absent when only
    π_ref was sampled).
    """
    traj, lam = select_trajectories(scores, K, strength)
    logq_prop = traj["logq_proposal"] if lam > 0 else None
    traj = traj.assign(log_mu=mixture_log_density(traj.logq_ref, logq_prop, lam))
    check_finite(traj, ["reward", "logp_ref", "log_mu"])
    traj["log_w"] = log_weights(traj.reward, traj.logp_ref, traj.log_mu, beta)
    rows = []
    for pid, g in traj.groupby("prompt_id", sort=False):
        d = is_diagnostics(g.log_w.to_numpy())
        rows.append(
            {
                "prompt_id": pid,
                "log_z_hat": log_z_hat(g.log_w.to_numpy()),
                **d,
                "n_rewarded": int((g.reward > 0).sum()),
            }
        )
    table = pd.DataFrame(rows)
    table["degenerate"] = table.ess < min_ess
    table["beta"], table["strength"], table["strength_effective"] = beta, strength, lam
    if log_p_correct is not None:
        table["log_z"] = exact_log_z(log_p_correct.reindex(table.prompt_id).to_numpy(), beta)
        table["error"] = table.log_z_hat - table.log_z
        table["covered"] = table.error.abs() <= 2 * table.se
    return table


def anchor_summary(table: pd.DataFrame) -> dict[str, float]:
    """Flat statistics of an anchor table for ``summary.json``."""
    out = {
        "anchor.prompts": int(len(table)),
        "anchor.mean_log_z_hat": float(table.log_z_hat.mean()),
        "anchor.mean_ess_frac": float(table.ess_frac.mean()),
        "anchor.min_ess": float(table.ess.min()),
        "anchor.mean_se": float(table.se.mean()),
        "anchor.mean_bias_delta": float(table.bias.mean()),
        "anchor.degenerate_prompts": int(table.degenerate.sum()),
        "anchor.mean_rewarded": float(table.n_rewarded.mean()),
    }
    if "log_z" in table:
        out |= {
            "anchor.mean_abs_error": float(table.error.abs().mean()),
            "anchor.mean_error": float(table.error.mean()),
            "anchor.coverage_2se": float(table.covered.mean()),
        }
    return out
