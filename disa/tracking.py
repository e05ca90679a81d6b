"""Experiment tracking: Lightning loggers (CSV, W&B) built from the ``logger`` config group.

One W&B run per job: it is created here, receives the fully resolved config, and is
finished in :func:`finish` (called from a ``finally``, marked failed when the job raised),
so that Hydra multirun jobs never share a run, even when one of them fails. Per run:

- ``group``: ``logger.wandb.group``, else the sweep directory's name in a multirun (one
  group per sweep), else none; ``job_type``: ``logger.wandb.job_type``, else the ``stage``
  setting (``all``, ``anchor``, ...); ``name``: ``logger.wandb.name``, else
  ``<group>/<job num>`` in a multirun and the run directory's name otherwise;
- the flat summary (the keys of ``summary.json``) as the run summary;
- a few dozen evaluation samples of π_ref and of the trained policy as a ``wandb.Table``
  (and the bias-variance study's aggregate, when the job ran it);
- the cached rollouts and scores (references to the cache directories, no upload) and the
  frozen anchor table (the file) as W&B artifacts named after their cache keys, so the
  lineage rollouts → scores → anchor is visible and runs sharing a cache share versions.

W&B is skipped, with nothing imported, when ``logger.wandb`` is absent (``logger=csv``,
``logger=none``) or its mode (or ``WANDB_MODE``) is ``disabled``; ``WANDB_MODE=offline``
writes the runs under each run directory for a later ``wandb sync``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: rows of evaluation samples per policy in the W&B table: the first few prompts × samples
TABLE_PROMPTS, TABLE_SAMPLES_PER_PROMPT = 8, 3

#: stage of a cache artifact → its W&B artifact type (logged by reference, never uploaded)
_BY_REFERENCE = {"sample": "rollouts", "score": "scores"}


def sweep_name() -> str | None:
    """The sweep directory's name when this job is part of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def wandb_enabled(lcfg: DictConfig | None) -> bool:
    """Whether a ``logger.wandb`` config asks for a run at all."""
    if lcfg is None or "_target_" not in lcfg:
        return False
    return "disabled" not in (str(lcfg.get("mode")), os.environ.get("WANDB_MODE", ""))


def wandb_run_settings(cfg: DictConfig, lcfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``name``, ``group`` and ``job_type`` of this job's W&B run (module docstring)."""
    sweep = sweep_name()
    group = lcfg.get("group") or sweep
    name = lcfg.get("name") or (f"{group}/{run_dir.name}" if sweep else run_dir.name)
    return {"name": name, "group": group, "job_type": lcfg.get("job_type") or str(cfg.stage)}


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            if not wandb_enabled(lcfg):
                continue
            extra = wandb_run_settings(cfg, lcfg, run_dir)
        elif lcfg is None or "_target_" not in lcfg:
            # e.g. an experiment that sets `logger.x.group` while `logger=none` dropped x
            continue
        else:
            extra = {}
        lg = instantiate(lcfg, save_dir=str(run_dir), **extra)
        if name == "wandb" and getattr(lg, "_wandb_init", {}).get("anonymous", "") is None:
            # Lightning passes anonymous=None to wandb.init, which W&B 0.19+ answers with a
            # deprecation warning on every run; None is W&B's default anyway
            del lg._wandb_init["anonymous"]
        loggers.append(lg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)
    return loggers


def _is_wandb(lg: Any) -> bool:
    return type(lg).__name__ == "WandbLogger"


def log_summary(
    loggers: list, summary: dict[str, Any], artifacts: dict[str, Any] | None = None
) -> None:
    """The flat summary to every logger; to W&B also the sample tables and, of ``artifacts``
    (the cache artifacts the job built or reused, by label: ``sample.ref``, ``score``,
    ``anchor``, ...), the rollouts, scores and anchor."""
    numeric = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for lg in loggers:
        _learn_csv_header(lg)
        lg.log_metrics(numeric)
        if _is_wandb(lg):
            run = lg.experiment
            run.summary.update(summary)
            log_wandb_tables(run, Path(lg.save_dir))
            log_wandb_artifacts(run, artifacts or {}, summary)
        lg.save()


def _learn_csv_header(lg: Any) -> None:
    """Teach a CSV logger the columns already in its file. Under ``trainer.strategy=ddp_spawn``
    the training metrics are written by a spawned process's copy of the logger; the main
    process's copy, appending the summary, must know that header, or Lightning's rewrite of
    the file (on new columns) fails on the rows it does not know."""
    if type(lg).__name__ != "CSVLogger":
        return
    writer = lg.experiment  # created when the hyperparameters were logged, in this process
    path = getattr(writer, "metrics_file_path", None)
    if path is None or not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    unknown = [k for k in header if k not in writer.metrics_keys]
    if unknown:
        writer.metrics_keys.extend(unknown)
        writer.metrics_keys.sort()


def sample_rows(run_dir: Path) -> tuple[list[str], list[list]]:
    """Columns and rows of the evaluation-samples table: the first
    ``TABLE_SAMPLES_PER_PROMPT`` samples of the first ``TABLE_PROMPTS`` prompts of each
    evaluated policy (``eval_samples_{ref,policy}.parquet`` in the run directory)."""
    import pandas as pd

    columns = ["model", "prompt_id", "sample_idx", "text", "reward", "n_tokens"]
    rows: list[list] = []
    for model in ("ref", "policy"):
        path = run_dir / f"eval_samples_{model}.parquet"
        if not path.exists():
            continue
        df = pd.read_parquet(path)
        prompts = df.prompt_id.drop_duplicates().head(TABLE_PROMPTS)
        df = df[df.prompt_id.isin(prompts) & (df.sample_idx < TABLE_SAMPLES_PER_PROMPT)]
        rows += [[model, *r] for r in df[columns[1:]].itertuples(index=False, name=None)]
    return columns, rows


def log_wandb_tables(run: Any, run_dir: Path) -> None:
    """Sample completions (and a study's aggregate) as ``wandb.Table``s."""
    import pandas as pd
    import wandb

    tables = {}
    columns, rows = sample_rows(run_dir)
    if rows:
        tables["eval_samples"] = wandb.Table(columns=columns, data=rows)
    agg = run_dir / "bias_variance_agg.parquet"
    if agg.exists():
        tables["bias_variance"] = wandb.Table(dataframe=pd.read_parquet(agg))
    if tables:
        run.log(tables)


def log_wandb_artifacts(run: Any, artifacts: dict[str, Any], summary: dict[str, Any]) -> None:
    """The job's cached rollouts and scores (by reference) and its anchor table (the file),
    named after their cache keys, with the spec that determined each as metadata.

    An artifact this job built is logged as its output; one it reused from the cache is
    marked as its input (online runs; offline runs log both kinds, W&B dedupes them).
    """
    import wandb

    for label, cached in artifacts.items():
        stage = label.split(".")[0]
        reused = bool(summary.get(f"reused.{stage}"))
        spec = cached.manifest().get("spec", {})
        if stage in _BY_REFERENCE:
            art = wandb.Artifact(
                f"{label.replace('.', '-')}-{cached.key}",
                type=_BY_REFERENCE[stage],
                metadata={"stage": stage, "key": cached.key, "spec": spec},
            )
            # large: recorded, never uploaded
            art.add_reference(f"file://{cached.path}", checksum=False)
        elif stage == "anchor":
            meta = {k: v for k, v in summary.items() if k.startswith("anchor.")}
            art = wandb.Artifact(
                f"anchor-{cached.key}",
                type="anchor",
                metadata={"key": cached.key, "spec": spec, **meta},
            )
            art.add_file(str(cached.path / "anchor.parquet"))
        else:
            continue
        _log_artifact(run, art, reused=reused)


def _log_artifact(run: Any, art: Any, reused: bool) -> None:
    if reused and not run.offline:  # use_artifact needs the server
        run.use_artifact(art)
    else:
        run.log_artifact(art)


def finish(loggers: list) -> None:
    """Close every logger; called from a ``finally``, so an exception in flight marks the
    W&B run as failed instead of finished."""
    failed = sys.exc_info()[0] is not None
    for lg in loggers:
        lg.finalize("failed" if failed else "success")
    if any(_is_wandb(lg) for lg in loggers):
        import wandb

        wandb.finish(exit_code=1 if failed else 0)
