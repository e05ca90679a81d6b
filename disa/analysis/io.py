"""Reading runs: sweep directories (``summary.json`` and per-run tables) and W&B projects."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

#: summary.json keys that describe a run's configuration (tagged onto per-run tables)
CONFIG_KEYS = (
    "algorithm",
    "backbone",
    "task",
    "proposal.kind",
    "proposal.strength",
    "proposal.strength_effective",
    "proposal.num_samples",
    "beta",
    "seed",
    "stage",
    "eval.split",
    "backbone.pretrain_seed",
)


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of ``sweep_dir`` (any depth), with a ``run_dir`` column."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        rows.append({**json.loads(path.read_text()), "run_dir": str(path.parent)})
    if not rows:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    return pd.DataFrame(rows)


def _run_dir_of(path: Path, root: Path) -> Path:
    """The run directory holding ``path``: the nearest ancestor (up to ``root``) with a
    ``summary.json``, else the file's own directory."""
    for parent in path.parents:
        if (parent / "summary.json").exists():
            return parent
        if parent == root:
            break
    return path.parent


def load_run_tables(
    sweep_dir: str | Path, pattern: str, config_keys: Sequence[str] = CONFIG_KEYS
) -> pd.DataFrame:
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
        summary_path = run / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
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


def load_per_prompt(sweep_dir: str | Path) -> pd.DataFrame:
    """Every run's evaluation metrics prompt by prompt (``eval_per_prompt.parquet``: one row
    per run × model ("ref", "policy") × prompt), with config choices: what
    :func:`disa.analysis.stats.paired_differences` resamples."""
    return load_run_tables(sweep_dir, "eval_per_prompt.parquet")


def load_training_curves(sweep_dir: str | Path) -> pd.DataFrame:
    """The CSV logger's ``metrics.csv`` of every run (one row per logged step)."""
    return load_run_tables(sweep_dir, "csv/*/metrics.csv")


def load_bias_variance(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bias-variance study of ``run_dir`` (or of every run under a sweep): the tidy
    per-replicate table and the per-(K, β, λ) aggregate (see :mod:`disa.studies`)."""
    tidy = load_run_tables(run_dir, "bias_variance.parquet")
    return tidy, load_run_tables(run_dir, "bias_variance_agg.parquet")


def varying(df: pd.DataFrame, keys: Sequence[str] = CONFIG_KEYS) -> list[str]:
    """The config keys that take more than one value across the runs of ``df``."""
    return [k for k in keys if k in df and df[k].nunique(dropna=False) > 1]


def load_wandb(
    project: str,
    *,
    entity: str | None = None,
    group: str | None = None,
    filters: dict | None = None,
    api: Any = None,
) -> pd.DataFrame:
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
        summary = {
            k: v
            for k, v in dict(run.summary).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))
        }
        rows.append(
            {
                **summary,
                "wandb.id": run.id,
                "wandb.name": run.name,
                "wandb.group": run.group,
                "wandb.job_type": run.job_type,
                "wandb.state": run.state,
            }
        )
    return pd.DataFrame(rows)


def _search_roots(roots: Iterable[str]) -> list[Path]:
    """``roots`` relative to the working directory, or to its parent (a notebook started
    from ``notebooks/``)."""
    bases = (Path.cwd(), Path.cwd().parent)
    return [base / r for r in roots for base in bases if (base / r).is_dir()]


def latest_run(
    filename: str = "summary.json", roots: Sequence[str] = ("outputs", "multirun")
) -> Path:
    """The run directory whose ``filename`` was written last, under ``roots``."""
    found = [
        p for root in _search_roots(roots) for p in root.rglob(filename) if "wandb" not in p.parts
    ]
    if not found:
        raise FileNotFoundError(
            f"no {filename} under {list(roots)}; run an experiment first or set DISA_SWEEP_DIR"
        )
    return max(found, key=lambda p: p.stat().st_mtime).parent


def latest_sweep(match: str = "", roots: Sequence[str] = ("multirun",)) -> Path:
    """The newest multirun directory (it holds Hydra's ``multirun.yaml``) whose name or
    ``multirun.yaml`` (its overrides, e.g. ``experiment=baselines``) contains ``match``."""
    found = [
        p
        for root in _search_roots(roots)
        for p in root.rglob("multirun.yaml")
        if match in p.parent.name or match in p.read_text()
    ]
    if not found:
        raise FileNotFoundError(
            f"no multirun directory matching {match!r} under {list(roots)}; "
            "run a sweep first or set DISA_SWEEP_DIR"
        )
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
