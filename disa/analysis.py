"""Sweeps → tidy pandas frames, seed aggregation, comparison tables, plots and theory.

A sweep directory holds one run directory per job, each with a flat ``summary.json``;
:func:`load_sweep` reads them all into one DataFrame (one row per job). Per-run tables
(``anchor.parquet``, ``eval_samples_*.parquet``, ``bias_variance.parquet``, the CSV
logger's ``metrics.csv``) load with :func:`load_run_tables` and friends, each row tagged
with its run's config choices; :func:`load_wandb` reads the same flat summaries from a W&B
project instead. The delta-method curves of the IS estimator (:func:`predicted_bias`,
:func:`predicted_var`) and the exact plain-Monte-Carlo ones for binary rewards
(:func:`binary_ess_frac`, :func:`binary_mc_moments`) are what the bias-variance study is
checked against.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: metrics of the baseline comparison table, in display order
COMPARISON_METRICS = (
    "policy.mean_at_k", "policy.p_correct_exact", "policy.p_correct_target", "policy.pass_at_1",
    "policy.pass_at_4", "policy.pass_at_16", "policy.unique_correct", "policy.coverage", "policy.tv_target", "policy.kl_target",
    "policy.tv_rewarded", "policy.kl_rewarded", "train.wall_s", "train.steps", "train.tokens_generated",
)


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of ``sweep_dir`` (any depth), with a ``run_dir`` column."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        rows.append({**json.loads(path.read_text()), "run_dir": str(path.parent)})
    if not rows:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    return pd.DataFrame(rows)


def aggregate(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, standard error (sd/√n, n−1 in sd) and n over the rows of each group.

    Columns: ``by..., {metric}.mean, {metric}.se, n``. A metric missing from a run counts
    as missing for that run (never as zero); se is NaN where a group has one run.
    """
    present = [m for m in metrics if m in df]
    g = df.groupby(list(by), sort=True)[present]
    mean, sd, n = g.mean(), g.std(ddof=1), g.count()
    out = pd.DataFrame(index=mean.index)
    for m in present:
        out[f"{m}.mean"] = mean[m]
        out[f"{m}.se"] = sd[m] / np.sqrt(n[m])
    out["n"] = g.size()
    return out.reset_index()


#: summary.json keys that describe a run's configuration (tagged onto per-run tables)
CONFIG_KEYS = (
    "algorithm", "backbone", "task", "proposal.kind", "proposal.strength",
    "proposal.strength_effective", "proposal.num_samples", "beta", "seed", "stage",
)


def _run_dir_of(path: Path, root: Path) -> Path:
    """The run directory holding ``path``: the nearest ancestor (up to ``root``) with a
    ``summary.json``, else the file's own directory."""
    for parent in path.parents:
        if (parent / "summary.json").exists():
            return parent
        if parent == root:
            break
    return path.parent


def load_run_tables(sweep_dir: str | Path, pattern: str, config_keys: Sequence[str] = CONFIG_KEYS) -> pd.DataFrame:
    """Concatenate every per-run table matching ``pattern`` (a glob, e.g. ``"anchor.parquet"``
    or ``"csv/*/metrics.csv"``) under ``sweep_dir``, each row tagged with its run's
    ``config_keys`` from ``summary.json`` (a column the table already has is kept as is)
    and ``run_dir``. ``sweep_dir`` may also be a single run directory."""
    root = Path(sweep_dir)
    frames = []
    for path in sorted(root.rglob(pattern)):
        if "wandb" in path.relative_to(root).parts:  # W&B's own copies of run files
            continue
        run = _run_dir_of(path, root)
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        for key in config_keys:
            if key in summary and key not in table:
                table[key] = summary[key]
        table["run_dir"] = str(run)
        frames.append(table)
    if not frames:
        raise FileNotFoundError(f"no {pattern} under {sweep_dir}")
    return pd.concat(frames, ignore_index=True)


def load_anchors(sweep_dir: str | Path) -> pd.DataFrame:
    """Every run's frozen anchor table (one row per run × prompt) with its config choices."""
    return load_run_tables(sweep_dir, "anchor.parquet")


def load_eval_samples(sweep_dir: str | Path, policy: str = "policy") -> pd.DataFrame:
    """Every run's evaluation samples of ``policy`` ("policy" or "ref"), with config choices."""
    return load_run_tables(sweep_dir, f"eval_samples_{policy}.parquet")


def load_training_curves(sweep_dir: str | Path) -> pd.DataFrame:
    """The CSV logger's ``metrics.csv`` of every run (one row per logged step)."""
    return load_run_tables(sweep_dir, "csv/*/metrics.csv")


def load_bias_variance(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bias-variance study of ``run_dir`` (or of every run under a sweep): the tidy
    per-replicate table and the per-(K, β, λ) aggregate (see :mod:`disa.studies`)."""
    return load_run_tables(run_dir, "bias_variance.parquet"), load_run_tables(run_dir, "bias_variance_agg.parquet")


def varying(df: pd.DataFrame, keys: Sequence[str] = CONFIG_KEYS) -> list[str]:
    """The config keys that take more than one value across the runs of ``df``."""
    return [k for k in keys if k in df and df[k].nunique(dropna=False) > 1]


def load_wandb(project: str, *, entity: str | None = None, group: str | None = None,
               filters: dict | None = None, api: Any = None) -> pd.DataFrame:
    """One row per W&B run of ``project`` (one ``group`` if given): the run's flat summary
    (the keys of ``summary.json``) plus ``wandb.{id,name,group,job_type,state}``.

    ``api`` defaults to ``wandb.Api()`` (needs network and credentials); pass another object
    with the same ``runs(path, filters=...)`` method to read elsewhere.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    flt = dict(filters or {})
    if group is not None:
        flt["group"] = group
    rows = []
    for run in api.runs(f"{entity}/{project}" if entity else project, filters=flt):
        summary = {k: v for k, v in dict(run.summary).items()
                   if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
        rows.append({**summary, "wandb.id": run.id, "wandb.name": run.name, "wandb.group": run.group,
                     "wandb.job_type": run.job_type, "wandb.state": run.state})
    return pd.DataFrame(rows)


def _search_roots(roots: Iterable[str]) -> list[Path]:
    """``roots`` relative to the working directory, or to its parent (a notebook started
    from ``notebooks/``)."""
    return [base / r for r in roots for base in (Path.cwd(), Path.cwd().parent) if (base / r).is_dir()]


def latest_run(filename: str = "summary.json", roots: Sequence[str] = ("outputs", "multirun")) -> Path:
    """The run directory whose ``filename`` was written last, under ``roots``."""
    found = [p for root in _search_roots(roots) for p in root.rglob(filename) if "wandb" not in p.parts]
    if not found:
        raise FileNotFoundError(f"no {filename} under {list(roots)}; run an experiment first or set DISA_SWEEP_DIR")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def latest_sweep(match: str = "", roots: Sequence[str] = ("multirun",)) -> Path:
    """The newest multirun directory (it holds Hydra's ``multirun.yaml``) whose name or
    ``multirun.yaml`` (its overrides, e.g. ``experiment=baselines``) contains ``match``."""
    found = [p for root in _search_roots(roots) for p in root.rglob("multirun.yaml")
             if match in p.parent.name or match in p.read_text()]
    if not found:
        raise FileNotFoundError(f"no multirun directory matching {match!r} under {list(roots)}; "
                                "run a sweep first or set DISA_SWEEP_DIR")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def latest_sweeps(*matches: str, roots: Sequence[str] = ("multirun",)) -> list[Path]:
    """The newest sweep for each of ``matches`` that has one; the newest sweep if none has."""
    found = []
    for m in matches:
        with contextlib.suppress(FileNotFoundError):
            found.append(latest_sweep(m, roots))
    return found or [latest_sweep("", roots)]


def sweep_dirs_from_env(var: str = "DISA_SWEEP_DIR") -> list[Path]:
    """Directories named by ``$var`` (several separated by ``os.pathsep``), or []."""
    return [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p]


def pass_at_k_curves(df: pd.DataFrame, by: Sequence[str] = ("algorithm",)) -> pd.DataFrame:
    """Long table of unbiased pass@k against k, for π_ref and the trained policy:
    columns ``by..., model ("ref" | "policy"), k, mean, se, n`` (mean ± se over seeds)."""
    rows = []
    for model in ("ref", "policy"):
        cols = {int(c.rsplit("_", 1)[1]): c for c in df if c.startswith(f"{model}.pass_at_")}
        if not cols:
            continue
        agg = aggregate(df, list(by), list(cols.values()))
        for k, col in sorted(cols.items()):
            part = agg[list(by) + ["n"]].copy()
            part["model"], part["k"] = model, k
            part["mean"], part["se"] = agg[f"{col}.mean"], agg[f"{col}.se"]
            rows.append(part)
    return pd.concat(rows, ignore_index=True)[[*by, "model", "k", "mean", "se", "n"]]


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3g}" if math.isnan(se) else f"{mean:.3g} ± {se:.2g}"


def comparison_table(df: pd.DataFrame, metrics: Sequence[str] = COMPARISON_METRICS) -> pd.DataFrame:
    """The baselines table: one row per algorithm, ``mean ± se`` over seeds per metric."""
    agg = aggregate(df, ["algorithm"], metrics)
    table = pd.DataFrame({"algorithm": agg.algorithm, "seeds": agg.n})
    for m in metrics:
        if f"{m}.mean" in agg:
            table[m] = [_fmt(a, b) for a, b in zip(agg[f"{m}.mean"], agg[f"{m}.se"])]
    return table


def plot_comparison(df: pd.DataFrame, path: str | Path, metrics: Sequence[str] = (
        "policy.mean_at_k", "policy.coverage", "policy.tv_target")) -> Path:
    """Bar chart (mean ± se over seeds) of a few metrics per algorithm, with π_ref's value
    as a dashed line; saved as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no global figure state

    metrics = [m for m in metrics if m in df]
    agg = aggregate(df, ["algorithm"], metrics)
    fig = Figure(figsize=(4 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.bar(agg.algorithm, agg[f"{m}.mean"], yerr=agg[f"{m}.se"].fillna(0), capsize=3, color="#4C72B0")
        ref = m.replace("policy.", "ref.")
        if ref in df:
            ax.axhline(df[ref].mean(), ls="--", color="gray", label="π_ref")
            ax.legend(fontsize=8)
        ax.set_title(m.removeprefix("policy."))
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_comparison(sweep_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    df = load_sweep(sweep_dir)
    table = comparison_table(df)
    out = {"csv": sweep_dir / "comparison.csv", "md": sweep_dir / "comparison.md",
           "png": sweep_dir / "comparison.png"}
    aggregate(df, ["algorithm"], COMPARISON_METRICS).to_csv(out["csv"], index=False)
    out["md"].write_text(_markdown(table) + "\n")
    plot_comparison(df, out["png"])
    return out


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep analysis importable alone
    Callback = object  # type: ignore[assignment,misc]


class ComparisonCallback(Callback):
    """Hydra callback: at the end of a multirun, write the comparison table of its jobs."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        out = write_comparison(config.hydra.sweep.dir)
        print(f"comparison written to {out['md']}")


# -- theory: bias and variance of log Ẑ ---------------------------------------------------
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
        log_pmf = (math.lgamma(K + 1) - np.array([math.lgamma(x + 1) + math.lgamma(K - x + 1) for x in c])
                   + np.where(c > 0, c * np.log(p), 0.0) + np.where(c < K, (K - c) * np.log1p(-p), 0.0))
    pmf = np.exp(log_pmf)
    values = np.log1p(c * math.expm1(beta) / K)
    mean = float(pmf @ values)
    log_z = math.log1p(p * math.expm1(beta))
    return mean - log_z, float(pmf @ (values - mean) ** 2)
