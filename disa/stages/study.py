"""The study stage: an analysis over the cached rollouts after the anchor (``study.name``),
e.g. ``experiment=anchor_bias_variance``. The tables are computed by :mod:`disa.studies`;
this stage checks the study's settings, writes the tables into the run directory and
returns the ``study.*`` entries of ``summary.json``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from disa import studies
from disa.cache import Artifact
from disa.stages.context import Context
from disa.stages.oracle import ref_log_p_correct

log = logging.getLogger(__name__)


def bias_variance(ctx: Context, scores: Artifact | None, oracle: Artifact | None) -> dict[str, Any]:
    """The IS estimator against the exact log Z over K × β × λ (:func:`disa.studies.bias_variance_table`):
    writes ``bias_variance.parquet`` (tidy) and ``bias_variance_agg.{parquet,csv}``."""
    if scores is None:
        raise ValueError(
            "study.name=bias_variance needs the scored proposal rollouts; "
            f"algorithm={ctx.settings.algorithm!r} is online, use stage=anchor"
        )
    if oracle is None:
        raise ValueError(
            f"study.name=bias_variance needs the exact log Z; task={ctx.cfg.task.name!r} "
            "has no enumerable rewarded set"
        )
    s = ctx.cfg.study
    table, skipped = studies.bias_variance_table(
        scores.read_table("scores"),
        ref_log_p_correct(oracle),
        K=[int(k) for k in s.K],
        beta=[float(b) for b in s.beta],
        strength=[float(x) for x in s.strength],
        max_replicates=s.get("max_replicates"),
        min_replicates=int(s.get("min_replicates", 2)),
    )
    agg = studies.summarize_bias_variance(table)
    table.to_parquet(ctx.run_dir / "bias_variance.parquet", index=False)
    agg.to_parquet(ctx.run_dir / "bias_variance_agg.parquet", index=False)
    agg.to_csv(ctx.run_dir / "bias_variance_agg.csv", index=False, float_format="%.6g")
    if skipped:
        log.warning(
            "bias_variance: fewer than %s disjoint replicates in the cache, skipped %s",
            s.get("min_replicates", 2),
            studies.describe_skipped(skipped),
        )
    ratio = (agg["var"] / agg.pred_var).replace([np.inf, -np.inf], np.nan).dropna()
    return {
        "study.name": "bias_variance",
        "study.rows": int(len(table)),
        "study.settings": int(len(agg)),
        "study.skipped": studies.describe_skipped(skipped),
        "study.coverage_2se": float(table.covered.mean()),
        "study.mean_abs_error": float(table.error.abs().mean()),
        "study.median_var_ratio": float(ratio.median()) if len(ratio) else 0.0,
    }


#: name → study function ``(ctx, scores, oracle) -> flat dict``
STUDIES: dict[str, Callable[..., dict[str, Any]]] = {"bias_variance": bias_variance}


def run(ctx: Context, scores: Artifact | None, oracle: Artifact | None) -> dict[str, Any]:
    """Run the study named by ``study.name`` (timed as ``time.study_s``)."""
    s = ctx.cfg.study
    name = s.get("name")
    if name not in STUDIES:
        raise ValueError(f"study.name={name!r} is not known; allowed: {sorted(STUDIES)}")
    errors = []
    for key, ok, allowed in (
        ("K", lambda v: isinstance(v, int) and v >= 1, "integers >= 1"),
        ("beta", lambda v: isinstance(v, (int, float)) and v > 0, "numbers > 0"),
        ("strength", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "numbers in [0, 1]"),
    ):
        values = list(s.get(key) or [])
        if not values or not all(ok(v) and not isinstance(v, bool) for v in values):
            errors.append(
                f"study.{key}={values!r} is invalid; allowed: a non-empty list of {allowed}"
            )
    if errors:
        raise ValueError("invalid study configuration:\n  - " + "\n  - ".join(errors))
    with ctx.timed("study"):
        return STUDIES[name](ctx, scores, oracle)


def report(ctx: Context, result: dict[str, Any]) -> dict[str, Any]:
    return result
