"""Sweeps → tidy pandas frames, seed statistics, comparison tables and plots.

- :mod:`disa.analysis.io`: reading. A sweep directory holds one run directory per job,
  each with a flat ``summary.json``; :func:`load_sweep` reads them all into one DataFrame
  (one row per job). Per-run tables (``anchor.parquet``, ``eval_samples_*.parquet``,
  ``bias_variance.parquet``, the CSV logger's ``metrics.csv``) load with
  :func:`load_run_tables` and friends, each row tagged with its run's config choices;
  :func:`load_wandb` reads the same flat summaries from a W&B project instead;
  :func:`latest_run`, :func:`latest_sweep` find the newest output.
- :mod:`disa.analysis.stats`: mean ± standard error over seeds (:func:`mean_se`), pass@k
  curves, the baselines :func:`comparison_table`, and paired differences between arms
  (algorithms, settings, π_ref) with a bootstrap CI over seeds × prompts
  (:func:`paired_differences` on the per-prompt tables of :func:`load_per_prompt`).
- :mod:`disa.analysis.plots`: figures (:func:`plot_comparison`, and
  :func:`plot_log_z_calibration`: FlowRL's learned log Z_φ against DISA's frozen log Ẑ).
- :mod:`disa.analysis.report`: :func:`write_comparison` and the Hydra callback
  :class:`~disa.analysis.report.ComparisonCallback` that runs it after a multirun.

The theory curves of the estimator (delta method, exact plain-Monte-Carlo moments) live in
:mod:`disa.anchor.theory`.
"""

from disa.analysis.io import (
    CONFIG_KEYS,
    latest_run,
    latest_sweep,
    latest_sweeps,
    load_anchors,
    load_bias_variance,
    load_eval_samples,
    load_per_prompt,
    load_run_tables,
    load_sweep,
    load_training_curves,
    load_wandb,
    sweep_dirs_from_env,
    varying,
)
from disa.analysis.plots import anchor_calibration, plot_comparison, plot_log_z_calibration
from disa.analysis.report import paired_comparisons, write_comparison
from disa.analysis.stats import (
    COMPARISON_METRICS,
    PAIRED_COLUMNS,
    PAIRED_METRICS,
    REF_ARM,
    comparison_table,
    mean_se,
    paired_differences,
    paired_table,
    pass_at_k_curves,
    with_arms,
)

__all__ = [
    "anchor_calibration",
    "COMPARISON_METRICS",
    "CONFIG_KEYS",
    "PAIRED_COLUMNS",
    "PAIRED_METRICS",
    "REF_ARM",
    "comparison_table",
    "latest_run",
    "latest_sweep",
    "latest_sweeps",
    "load_anchors",
    "load_bias_variance",
    "load_eval_samples",
    "load_per_prompt",
    "load_run_tables",
    "load_sweep",
    "load_training_curves",
    "load_wandb",
    "mean_se",
    "paired_comparisons",
    "paired_differences",
    "paired_table",
    "pass_at_k_curves",
    "plot_comparison",
    "plot_log_z_calibration",
    "sweep_dirs_from_env",
    "varying",
    "with_arms",
    "write_comparison",
]
