"""One job: validate the config, run the stages it asks for, write ``summary.json``.

``summary.json`` is flat so that pandas reads a whole sweep (``pd.json_normalize`` not
needed). Its keys:

- config choices: ``algorithm``, ``backbone``, ``task``, ``proposal.kind``,
  ``proposal.strength``, ``proposal.strength_effective`` (the realised round(λK)/K),
  ``proposal.num_samples`` (K), ``beta``, ``seed``, ``stage``;
- ``anchor.*``: anchor statistics (mean log Ẑ, mean ESS/K, min ESS, mean delta-method se
  and bias, prompts flagged degenerate, mean rewarded samples; on the embedded task also
  ``anchor.mean_abs_error`` = mean |log Ẑ − log Z|, ``anchor.mean_error`` and
  ``anchor.coverage_2se`` = share of prompts whose exact log Z lies in log Ẑ ± 2 se);
- ``ref.*`` and ``policy.*``: evaluation of π_ref and of the trained policy on held-out
  prompts: ``mean_at_k``, ``pass_at_{j}``, ``solved_frac``, ``unique_correct`` (distinct
  correct answers per solved prompt), ``coverage`` (of the rewarded set), ``distinct_2``,
  and on the embedded task ``p_correct_exact``, ``tv_target``, ``kl_target``,
  ``tv_rewarded``, ``kl_rewarded`` (exact distances to p*; see
  :func:`disa.evaluation.target_distances`), ``tokens_generated``;
- ``train.*``: ``wall_s``, ``steps``, ``trajectories``, ``resumed``, final training metrics;
- ``time.{backbone,sample,score,oracle,anchor,train,evaluate,total}_s``: wall time of each
  stage in this job (a reused artifact costs only its verification);
- ``reused.{stage}``: whether the stage's artifact came from the cache;
- ``artifact.{stage}``: the cache key of each artifact (lineage).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from disa import anchor as anchoring
from disa import pipeline, tracking
from disa.cache import Cache, atomic_write_json, spec_key
from disa.config import validate
from disa.models import resolve_backbone
from disa.tasks import build_task


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the pipeline for ``cfg`` with outputs in ``run_dir``; return the summary.

    In a process of rank > 0 of a multi-process training launch (see :class:`_TrainingRank`)
    only the training is taken part in, and an empty summary is returned.
    """
    validate(cfg)
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = build_task(cfg)
    for split in ("train", cfg.eval.split):
        if len(task.prompts(split)) == 0:
            raise ValueError(f"task {cfg.task.name!r} has no {split!r} prompts")
    cache = Cache(cfg.cache_dir)
    rank = launch_rank()
    loggers = tracking.build_loggers(cfg, run_dir) if rank == 0 else []  # one W&B run, rank 0's
    try:
        t0 = time.perf_counter()
        backbone = resolve_backbone(cfg, task, cache)
        context = pipeline.Context if rank == 0 else _TrainingRank
        ctx = context(cfg, cache, task, backbone, run_dir, _device(cfg.device), loggers)
        ctx.timings["backbone"] = time.perf_counter() - t0
        summary = _choices(cfg)
        try:
            summary |= _run_stages(ctx, summary)
        except _TrainingRank.Done:
            return {}
        summary |= {f"time.{k}_s": round(v, 3) for k, v in ctx.timings.items()}
        summary["time.total_s"] = round(time.perf_counter() - t_start, 3)
        summary |= {f"reused.{k}": v for k, v in ctx.reused.items()}
        summary = pipeline.finite_or_raise(summary)
        atomic_write_json(run_dir / "summary.json", summary)
        tracking.log_summary(loggers, summary)
        print_summary(summary)
        return summary
    finally:
        tracking.finish(loggers)


def launch_rank() -> int:
    """This process's rank when a multi-process launcher started it, else 0.

    Lightning's DDP/FSDP/DeepSpeed launcher re-runs ``run.py`` for ranks > 0 with
    ``LOCAL_RANK`` (and ``NODE_RANK``) set; torchrun sets ``RANK``, SLURM ``SLURM_PROCID``.
    Rank 0's own process has none of them set > 0 (Lightning sets them only at ``fit``).
    """
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return max(int(os.environ.get(n) or 0) for n in names)


class _TrainingRank(pipeline.Context):
    """The context of a rank > 0: it runs the stages up to training and stops there.

    Rank 0 has sampled, scored and anchored before it launched the other ranks, so here those
    artifacts are only verified and read. Rank 0 holds the ``train`` artifact's build lock
    while it trains (and waits for the other ranks inside ``fit``), so a rank > 0 takes part in
    that fit without the lock, never finalises the artifact, and then raises :class:`Done`:
    no loggers, no evaluation, no ``summary.json`` (rank 0 writes all of those).
    """

    class Done(Exception):
        """This rank's share of the training is finished."""

    def build(self, stage, spec, builder, run_as=None):
        if stage != "train":
            return super().build(stage, spec, builder, run_as)
        art = self.cache.artifact(stage, spec)
        if not art.is_complete():
            builder(art)
        raise self.Done


def _choices(cfg: DictConfig) -> dict[str, Any]:
    return {
        "algorithm": cfg.algorithm.name,
        "backbone": cfg.backbone.name,
        "task": cfg.task.name,
        "proposal.kind": cfg.proposal.kind,
        "proposal.strength": pipeline.strength(cfg),
        "proposal.num_samples": int(cfg.proposal.num_samples),
        "beta": float(cfg.beta),
        "seed": int(cfg.seed),
        "stage": cfg.stage,
    }


def _run_stages(ctx: pipeline.Context, summary: dict) -> dict[str, Any]:
    cfg, out = ctx.cfg, {}
    last = pipeline.STAGES.index(cfg.stage) if cfg.stage != "all" else len(pipeline.STAGES) - 1

    scores = anchor = None
    oracle = pipeline.stage_oracle(ctx) if last >= 2 else None
    # Online algorithms sample from their own policy: no proposal rollouts, no anchor (unless
    # a proposal stage is asked for explicitly).
    if not cfg.algorithm.online or cfg.stage in ("sample", "score", "anchor"):
        rollouts = pipeline.stage_sample(ctx)
        out |= {f"artifact.sample.{c}": a.key for c, a in rollouts.items()}
        if last < 1:
            return out
        scores = pipeline.stage_score(ctx, rollouts)
        out["artifact.score"] = scores.key
        for comp, agreement in scores.manifest().get("sampler_agreement", {}).items():
            out |= {f"score.sampler_{k}.{comp}": v for k, v in agreement.items()}
        if last < 2:
            return out
        anchor = pipeline.stage_anchor(ctx, scores, oracle)
        table = anchor.read_table("anchor")
        out["artifact.anchor"] = anchor.key
        out["proposal.strength_effective"] = float(table.strength_effective.iloc[0])
        out |= anchoring.anchor_summary(table)
        shutil.copyfile(anchor.path / "anchor.parquet", ctx.run_dir / "anchor.parquet")
    if cfg.get("study"):  # an analysis over the cached rollouts (disa.studies), e.g. bias_variance
        from disa.studies import run_study

        out |= run_study(ctx, scores, oracle)
        if cfg.study.get("stop", True):  # the study is the job: no training, no evaluation
            return out
    if last < 3:
        return out
    trained = pipeline.stage_train(ctx, scores, anchor)
    out["artifact.train"] = trained.key
    info = trained.manifest()
    out |= {f"train.{k}": info[k] for k in ("wall_s", "steps", "resumed", "trajectories", "tokens_generated")}
    out |= {f"train.{k.removeprefix('train/')}": v for k, v in info["final"].items()}
    _link_checkpoint(trained.path, ctx.run_dir)
    if last < 4:
        return out
    ref_eval = pipeline.stage_evaluate(ctx, "ref", ctx.backbone.ref_path, ctx.backbone.ref_fingerprint)
    # keyed by the trained weights themselves: a rebuilt train artifact never reuses an
    # evaluation of other weights
    policy_fp = spec_key({k: v["sha256"] for k, v in info["files"].items() if k.startswith("policy/")})
    pol_eval = pipeline.stage_evaluate(ctx, "policy", str(trained.path / "policy"), policy_fp)
    for name, arts in (("ref", ref_eval), ("policy", pol_eval)):
        with ctx.timed("evaluate"):
            out |= {f"{name}.{k}": v for k, v in pipeline.policy_metrics(ctx, arts, oracle).items()}
            if cfg.eval.get("judge"):
                out |= {f"{name}.{k}": v for k, v in pipeline.judge_metrics(cfg, arts, ctx.task).items()}
        arts["samples"].read_table("samples").to_parquet(ctx.run_dir / f"eval_samples_{name}.parquet")
    return out


def _link_checkpoint(train_dir: Path, run_dir: Path) -> None:
    """Put the Lightning checkpoint and the trained policy in the run directory: hard links
    where the filesystem allows (free, even for large models), copies otherwise."""
    for src in [train_dir / "checkpoints" / "last.ckpt", *sorted((train_dir / "policy").glob("*"))]:
        dst = run_dir / ("checkpoints" if src.suffix == ".ckpt" else "policy") / src.name
        dst.parent.mkdir(exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def print_summary(summary: dict[str, Any]) -> None:
    """A short human summary: π_ref against the trained policy, and the anchor's accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = sorted({k.split(".", 1)[1] for k in summary if k.startswith(("ref.", "policy."))})
    if metrics:
        t = Table(title=f"{summary['algorithm']} on {summary['task']} (β={summary['beta']}, "
                        f"λ={summary['proposal.strength']}, K={summary['proposal.num_samples']})")
        t.add_column("metric")
        t.add_column("π_ref", justify="right")
        t.add_column("policy", justify="right")
        for m in metrics:
            fmt = [f"{summary[k]:.4g}" if isinstance(summary.get(k), float) else str(summary.get(k, "–"))
                   for k in (f"ref.{m}", f"policy.{m}")]
            t.add_row(m, *fmt)
        console.print(t)
    anchor = {k: v for k, v in summary.items() if k.startswith("anchor.")}
    if anchor:
        console.print("anchor: " + ", ".join(f"{k[7:]}={v:.4g}" for k, v in anchor.items()))
    times = {k: v for k, v in summary.items() if k.startswith("time.")}
    console.print("time (s): " + ", ".join(f"{k[5:-2]}={v:.1f}" for k, v in times.items()))


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
