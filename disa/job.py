"""One job: validate the config, resolve its settings, run the plan of stages it asks for
(:mod:`disa.stages`), write ``summary.json``.

``summary.json`` is flat so that pandas reads a whole sweep (``pd.json_normalize`` not
needed). Its keys:

- config choices: ``algorithm``, ``backbone``, ``task``, ``proposal.kind``,
  ``proposal.strength``, ``proposal.strength_effective`` (the realised round(λK)/K),
  ``proposal.num_samples`` (K), ``beta``, ``seed``, ``stage``, ``eval.split``, and for the
  embedded backbone ``backbone.source`` (shipped | pretrain) and ``backbone.pretrain_seed``;
- ``backbone.ref_fingerprint``: the content fingerprint of π_ref (equal on two machines iff
  they started from the same weights);
- ``anchor.*``: anchor statistics (mean log Ẑ, mean ESS/K, min ESS, mean delta-method se
  and bias, prompts flagged degenerate, mean rewarded samples; on an enumerable task (sumpairs) also
  ``anchor.mean_abs_error`` = mean |log Ẑ − log Z|, ``anchor.mean_error`` and
  ``anchor.coverage_2se`` = share of prompts whose exact log Z lies in log Ẑ ± 2 se);
- ``ref.*`` and ``policy.*``: evaluation of π_ref and of the trained policy on held-out
  prompts: ``mean_at_k``, ``pass_at_{j}``, ``solved_frac``, ``unique_correct`` (distinct
  correct answers per solved prompt), ``coverage`` (of the rewarded set), ``distinct_2``,
  and on an enumerable task (sumpairs) ``p_correct_exact``, ``tv_target``, ``kl_target``,
  ``tv_rewarded``, ``kl_rewarded`` (exact distances to p*; see
  :func:`disa.evaluation.target_distances`), ``tokens_generated``; on a code task
  ``sandbox.<guard>`` (:data:`disa.sandbox.GUARDS`): whether that guard confined every
  program graded for the model;
- ``train.*``: ``wall_s``, ``steps``, ``trajectories``, ``resumed``, final training metrics;
- ``time.{backbone,sample,score,oracle,anchor,train,evaluate,total}_s``: wall time of each
  stage in this job (a reused artifact costs only its verification); ``time.trajectories_s``
  is the part of ``time.train_s`` spent building the memory-mapped trajectory store;
- ``reused.{stage}``: whether the stage's artifact came from the cache;
- ``artifact.{stage}``: the cache key of each artifact (lineage).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from disa import stages, tracking
from disa.cache import Cache, CacheError, atomic_write_json
from disa.config import upgrade_config, validate
from disa.executors import build_executor
from disa.models import resolve_backbone
from disa.settings import Settings
from disa.tasks import build_task


def run(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the job ``cfg`` asks for with outputs in ``run_dir``; return the summary.

    In a process of rank > 0 of a multi-process training launch (:func:`launch_rank`) the
    plan stops after the training, which this process takes part in, and an empty summary
    is returned: rank 0 logs, evaluates and writes ``summary.json``.
    """
    cfg = upgrade_config(cfg)
    validate(cfg)
    settings = Settings.from_config(cfg)
    _no_per_model_progress_bars()
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = build_task(cfg)
    for split in ("train", cfg.eval.split):
        if len(task.prompts(split)) == 0:
            raise ValueError(f"task {cfg.task.name!r} has no {split!r} prompts")
    cache = Cache(cfg.cache_dir)
    leader = launch_rank() == 0
    loggers = tracking.build_loggers(cfg, run_dir) if leader else []  # one W&B run, rank 0's
    restore = _raise_on_signals()
    executor = build_executor(cfg.get("executor"))
    try:
        study = cfg.get("study")
        plan = stages.plan(
            settings.stage,
            online=settings.online,
            study=bool(study),
            study_stops=bool(study.get("stop", True)) if study else True,
            enumerable=hasattr(task, "rewarded_set"),
            leader=leader,
        )
        _check_inputs_cached(settings.stage, plan, cache)
        t0 = time.perf_counter()
        backbone = resolve_backbone(cfg, task, cache)
        ctx = stages.Context(
            settings,
            cfg,
            cache,
            task,
            backbone,
            run_dir,
            stages.resolve_device(cfg.device),
            loggers,
            leader,
            executor=executor,
        )
        ctx.timings["backbone"] = time.perf_counter() - t0
        results = stages.run_plan(ctx, plan)
        if not leader:
            return {}
        summary = (
            choices(settings, cfg)
            | {"backbone.ref_fingerprint": backbone.ref_fingerprint}
            | results
        )
        summary |= {f"time.{k}_s": round(v, 3) for k, v in ctx.timings.items()}
        summary["time.total_s"] = round(time.perf_counter() - t_start, 3)
        summary |= {f"reused.{k}": v for k, v in ctx.reused.items()}
        summary = finite_or_raise(summary)
        atomic_write_json(run_dir / "summary.json", summary)
        tracking.log_summary(loggers, summary, ctx.artifacts)
        print_summary(summary)
        return summary
    finally:
        executor.close()
        tracking.finish(loggers)
        restore()


def _check_inputs_cached(stage: str, plan: list[stages.Stage], cache: Cache) -> None:
    """``stage=<name>`` reuses the artifacts of the stages before it: refuse at once, before
    any backbone is loaded or pre-trained, when the cache holds none of a stage's. (Whether
    the exact artifacts exist is known only once the backbone is fingerprinted; the stage
    that reads one checks that.)"""
    if stage == "all":
        return
    missing = [
        s.name
        for s in plan
        if s.name in stages.CACHED_INPUTS and s.name != stage and not cache.has_any(s.name)
    ]
    if missing:
        raise CacheError(
            f"stage={stage} reuses cached {missing} artifacts, and cache_dir={cache.root} holds none; "
            f"run stage={missing[0]} (or stage=all) first"
        )


def _no_per_model_progress_bars() -> None:
    """Turn off transformers' bars of loading and saving one model ("Loading weights", "Writing
    model shards"): a job loads and saves models a dozen times, each bar a line of noise between
    the stages' own bars. Hub downloads keep theirs."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns off the hub's
    if hub_bars:
        enable_progress_bars()


class JobInterrupted(SystemExit):
    """A SIGTERM or SIGINT stopped the job: it exits 128 + the signal number, as a shell
    does, so a scheduler or a sweep records a failure, and the ``finally`` blocks on its way
    out mark the W&B run failed. Being a SystemExit, Lightning's graceful-shutdown path for
    KeyboardInterrupt (which returns normally, exit 0) does not swallow it."""


def _raise_on_signals():
    """Make SIGTERM and SIGINT raise :class:`JobInterrupted`; return a function that puts
    the previous handlers back. Signal handlers belong to the main thread: elsewhere
    (a joblib worker thread) this does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise JobInterrupted(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def launch_rank() -> int:
    """This process's rank when a multi-process launcher started it, else 0.

    Lightning's DDP/FSDP/DeepSpeed launcher re-runs ``run.py`` for ranks > 0 with
    ``LOCAL_RANK`` (and ``NODE_RANK``) set; torchrun sets ``RANK``, SLURM ``SLURM_PROCID``.
    Rank 0's own process has none of them set > 0 (Lightning sets them only at ``fit``).
    """
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return max(int(os.environ.get(n) or 0) for n in names)


def choices(settings: Settings, cfg: DictConfig) -> dict[str, Any]:
    """The config choices that identify a run in a sweep table."""
    return {
        "algorithm": settings.algorithm,
        "backbone": cfg.backbone.name,
        "task": cfg.task.name,
        "proposal.kind": settings.proposal_kind,
        "proposal.strength": settings.strength,
        "proposal.num_samples": settings.num_samples,
        "beta": settings.beta,
        "seed": settings.seed,
        "stage": settings.stage,
        "eval.split": str(cfg.eval.split),
        **(
            {
                "backbone.source": str(cfg.backbone.source),
                "backbone.pretrain_seed": int(cfg.backbone.pretrain.seed),
            }
            if cfg.backbone.kind == "embedded"
            else {}
        ),
    }


def finite_or_raise(summary: dict[str, Any]) -> dict[str, Any]:
    """A NaN never goes into a result silently: refuse it, naming the keys."""
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite values in the run summary: {bad}")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """A short human summary: π_ref against the trained policy, and the anchor's accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = sorted({k.split(".", 1)[1] for k in summary if k.startswith(("ref.", "policy."))})
    if metrics:
        t = Table(
            title=f"{summary['algorithm']} on {summary['task']} (β={summary['beta']}, "
            f"λ={summary['proposal.strength']}, K={summary['proposal.num_samples']})"
        )
        t.add_column("metric")
        t.add_column("π_ref", justify="right")
        t.add_column("policy", justify="right")
        for m in metrics:
            fmt = [
                f"{summary[k]:.4g}"
                if isinstance(summary.get(k), float)
                else str(summary.get(k, "–"))
                for k in (f"ref.{m}", f"policy.{m}")
            ]
            t.add_row(m, *fmt)
        console.print(t)
    anchor = {k: v for k, v in summary.items() if k.startswith("anchor.")}
    if anchor:
        console.print("anchor: " + ", ".join(f"{k[7:]}={v:.4g}" for k, v in anchor.items()))
    times = {k: v for k, v in summary.items() if k.startswith("time.")}
    console.print("time (s): " + ", ".join(f"{k[5:-2]}={v:.1f}" for k, v in times.items()))


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
