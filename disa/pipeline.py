"""The stages ``sample → score → anchor → train → evaluate``, each a cached artifact.

Each stage function takes the run :class:`Context`, builds (or reuses) its artifact and
returns it. A spec holds exactly the settings that determine the artifact, so

- the rollouts do not depend on β, λ or the algorithm: a β or λ sweep samples once;
- the anchor depends on β, K and λ and is cheap to recompute;
- the evaluation of π_ref is shared by every run with the same evaluation settings.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from disa import anchor as anchoring
from disa import evaluation
from disa.cache import Artifact, Cache, CacheError
from disa.models import Backbone, load_tokenizer
from disa.sampling import SamplerSettings, build_sampler, completion_text, encode_prompt

STAGES = ("sample", "score", "anchor", "train", "evaluate")


@dataclass
class Context:
    cfg: Any
    cache: Cache
    task: Any
    backbone: Backbone
    run_dir: Path
    device: torch.device
    loggers: list = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def may_build(self, stage: str | tuple[str, ...]) -> bool:
        return self.cfg.stage == "all" or self.cfg.stage in ((stage,) if isinstance(stage, str) else stage)

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def build(self, stage: str, spec: dict, builder, run_as: str | tuple[str, ...] | None = None) -> Artifact:
        """Reuse the artifact if cached; build it only when ``run_as`` (default: ``stage``)
        is the stage being run."""
        art = self.cache.artifact(stage, spec)
        if not art.is_complete() and not self.may_build(run_as or stage):
            raise CacheError(
                f"stage={self.cfg.stage} needs the {stage!r} artifact {art.key}, which is not in "
                f"cache_dir={self.cache.root}; run stage={stage} (or stage=all) first"
            )
        with self.timed(stage):
            art, reused = self.cache.build(stage, spec, builder)
        self.reused[stage] = reused and self.reused.get(stage, True)
        return art


def components(cfg) -> list[str]:
    """Mixture components the proposal draws from: π_ref, the proposal model, or both."""
    return {"ref": ["ref"], "model": ["proposal"], "mixture": ["ref", "proposal"]}[cfg.proposal.kind]


def strength(cfg) -> float:
    """λ: 0 for ``ref`` (plain Monte Carlo), 1 for ``model``, ``proposal.strength`` for a mixture."""
    return {"ref": 0.0, "model": 1.0}.get(cfg.proposal.kind, float(cfg.proposal.strength))


def _model_for(ctx: Context, component: str):
    path = ctx.backbone.ref_path if component == "ref" else ctx.backbone.proposal_path
    return ctx.backbone.load(path, ctx.device).eval()


def _fingerprint(ctx: Context, component: str) -> str:
    return ctx.backbone.ref_fingerprint if component == "ref" else ctx.backbone.proposal_fingerprint


def _chat(cfg) -> bool:
    return bool(cfg.task.get("chat_template", False))


def _shards(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


# -- 1. sample ----------------------------------------------------------------------------
def stage_sample(ctx: Context) -> dict[str, Artifact]:
    """K proposal trajectories per training prompt from every mixture component."""
    cfg = ctx.cfg
    settings = SamplerSettings.from_cfg(cfg.sampler)
    K = int(cfg.proposal.num_samples)
    prompts = ctx.task.prompts("train")
    arts = {}
    for comp in components(cfg):
        # shard layout and batch size fix which random stream each sample comes from: a
        # resume with another layout must not mix two streams (duplicates, no error)
        spec = {"task": ctx.task.spec(), "split": "train", "model": _fingerprint(ctx, comp),
                "dtype": ctx.backbone.dtype, "sampler": settings.spec(), "K": K, "seed": int(cfg.seed),
                "component": comp, "prompts_per_shard": int(cfg.sampler.prompts_per_shard),
                "batch_size": int(cfg.sampler.batch_size)}

        def build(art: Artifact, comp=comp) -> dict:
            tok = load_tokenizer(ctx.backbone.ref_path)
            model = _model_for(ctx, comp)
            sampler = build_sampler(cfg)
            shards = _shards(len(prompts), int(cfg.sampler.prompts_per_shard))
            from tqdm.auto import tqdm

            for i, rows in enumerate(tqdm(shards, desc=f"sample {comp}", leave=False)):
                if art.has_shard(i):  # resume: this shard was written by an earlier run
                    continue
                chunk = prompts.iloc[list(rows)]
                p_ids = [encode_prompt(tok, p, _chat(cfg)) for p in chunk.prompt]
                comps = sampler.sample(model, tok, p_ids, K, settings, seed=_shard_seed(cfg.seed, comp, i))
                shard = pd.DataFrame([
                    {"prompt_id": pid, "component": comp, "sample_idx": j, "prompt_ids": p,
                     "completion_ids": c, "text": completion_text(tok, c),
                     "finished": bool(c) and c[-1] == tok.eos_token_id}
                    for pid, p, cs in zip(chunk.prompt_id, p_ids, comps) for j, c in enumerate(cs)
                ])
                # An engine that reports its own log-probs (vLLM) has them kept beside the
                # trajectories, for the consistency check of the score stage; they never
                # enter a weight or a loss.
                own = getattr(sampler, "last_logprobs", None)
                if own is not None:
                    shard["sampler_logprob"] = [float(x) for group in own for x in group]
                art.write_shard(i, shard)
            return {"sampler": settings.spec(), "rows": len(prompts) * K}

        arts[comp] = ctx.build("sample", spec, build)
    return arts


def _shard_seed(seed: int, component: str, shard: int) -> int:
    return (int(seed) * 1_000_003 + {"ref": 0, "proposal": 1}[component] * 7919 + shard) % (2**31)


# -- 2. score -----------------------------------------------------------------------------
def stage_score(ctx: Context, rollouts: dict[str, Artifact]) -> Artifact:
    """Reward, ``log π_ref`` and ``log q_c`` under every component for every trajectory."""
    cfg = ctx.cfg
    settings = SamplerSettings.from_cfg(cfg.sampler)
    comps = components(cfg)
    spec = {"rollouts": {c: a.key for c, a in rollouts.items()}, "task": ctx.task.spec(),
            "scorers": {c: _fingerprint(ctx, c) for c in ["ref", *comps]}, "dtype": ctx.backbone.dtype,
            "sampler": settings.spec()}

    def build(art: Artifact) -> dict:
        frame = pd.concat([a.read_shards() for a in rollouts.values()], ignore_index=True)
        tok = load_tokenizer(ctx.backbone.ref_path)
        size = int(cfg.sampler.score_batch_size) * 8
        shards = _shards(len(frame), size)
        # one model in memory at a time: every trajectory is scored by π_ref, then by the proposal
        passes = [("ref", "logp_ref", SamplerSettings(max_new_tokens=settings.max_new_tokens))]
        for comp in comps:
            if not (comp == "ref" and settings.is_identity):  # logq_ref == logp_ref then
                passes.append((comp, f"logq_{comp}", settings))
        for comp, column, s in passes:
            model = None
            for i, rows in enumerate(shards):
                if art.has_shard(i, prefix=column):
                    continue
                model = model or _model_for(ctx, comp)
                part = frame.iloc[list(rows)]
                lp = _score(model, tok, part, s, cfg, desc=f"score {column} {i + 1}/{len(shards)}")
                art.write_shard(i, pd.DataFrame({column: lp}), prefix=column)
            del model
        out = frame.copy()
        out["reward"] = ctx.task.rewards(_prompt_rows(ctx.task, out.prompt_id), out.text.tolist())
        for _, column, _ in passes:
            out[column] = art.collect_shards(column)[column].to_numpy()
        if "logq_ref" not in out and "ref" in comps:
            out["logq_ref"] = out["logp_ref"]
        out["n_tokens"] = out.completion_ids.map(len)
        anchoring.check_finite(out, ["reward", "logp_ref"])
        art.write_table("scores", out)
        art.remove_shards()
        return {"rows": len(out), "sampler_agreement": sampler_agreement(out)}

    return ctx.build("score", spec, build)


def sampler_agreement(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per component, how far the sampling engine's own log-probs (``sampler_logprob``, where
    the engine reported them) are from the harness's scored ``logq_<component>``: the one
    source of truth for weights and losses is the scorer, and a large gap means the engine
    sampled from another model than the one scored (dtype, kernels, another checkpoint).
    Components without any reported value are left out (never a NaN)."""
    from disa.sampling.vllm import logprob_agreement

    if "sampler_logprob" not in scores:
        return {}
    out = {}
    for comp, g in scores.groupby("component", sort=True):
        column = f"logq_{comp}"
        agreement = logprob_agreement(g.sampler_logprob, g[column], g.n_tokens)
        if agreement["compared"] > 0:
            out[str(comp)] = agreement
    return out


def _score(model, tok, part: pd.DataFrame, s: SamplerSettings, cfg, desc: str) -> np.ndarray:
    from disa.scoring import sequence_logprobs

    return sequence_logprobs(
        model, part.prompt_ids.tolist(), part.completion_ids.tolist(), tok.pad_token_id,
        batch_size=int(cfg.sampler.score_batch_size), temperature=s.temperature, top_k=s.top_k,
        top_p=s.top_p, progress=desc,
    ).numpy()


def _prompt_rows(task, prompt_ids: pd.Series) -> pd.DataFrame:
    allp = pd.concat([task.prompts("train"), task.prompts("test")]).set_index("prompt_id")
    return allp.loc[prompt_ids.to_numpy()].reset_index()


# -- exact oracle (enumerable tasks only) --------------------------------------------------
def stage_oracle(ctx: Context) -> Artifact | None:
    """``log π_ref`` of every rewarded completion of every prompt (exact log Z and p*)."""
    if not hasattr(ctx.task, "rewarded_set"):
        return None
    return _rewarded_table(ctx, ctx.backbone.ref_path, ctx.backbone.ref_fingerprint, ("anchor", "train", "evaluate"))


def _rewarded_table(ctx: Context, model_path: str, fp: str, run_as: tuple[str, ...]) -> Artifact:
    from disa.oracle import rewarded_logprobs

    spec = {"task": ctx.task.spec(), "model": fp, "dtype": ctx.backbone.dtype, "kind": "rewarded-set log-probs"}

    def build(art: Artifact) -> dict:
        model = ctx.backbone.load(model_path, ctx.device).eval()
        tok = load_tokenizer(model_path)
        prompts = pd.concat([ctx.task.prompts("train"), ctx.task.prompts("test")], ignore_index=True)
        table = rewarded_logprobs(model, tok, ctx.task, prompts, progress="teacher-force rewarded set")
        art.write_table("rewarded", table)
        return {"rows": len(table)}

    # part of anchoring (for π_ref) or of evaluation (for a policy): built with those stages
    return ctx.build("oracle", spec, build, run_as=run_as)


# -- 3. anchor ----------------------------------------------------------------------------
def stage_anchor(ctx: Context, scores: Artifact, oracle: Artifact | None) -> Artifact:
    """The frozen ``prompt → log Ẑ`` table with per-prompt diagnostics."""
    cfg = ctx.cfg
    lam = strength(cfg)
    spec = {"scores": scores.key, "beta": float(cfg.beta), "K": int(cfg.proposal.num_samples),
            "strength": lam, "min_ess": float(cfg.proposal.min_ess),
            "oracle": oracle.key if oracle else None}

    def build(art: Artifact) -> dict:
        from disa.oracle import log_p_correct

        lpc = log_p_correct(oracle.read_table("rewarded")) if oracle else None
        table = anchoring.build_anchor(
            scores.read_table("scores"), beta=float(cfg.beta), K=int(cfg.proposal.num_samples),
            strength=lam, min_ess=float(cfg.proposal.min_ess), log_p_correct=lpc,
        )
        table["proposal_kind"] = cfg.proposal.kind
        table["scores_key"] = scores.key
        art.write_table("anchor", table)
        return {"prompts": len(table)}

    return ctx.build("anchor", spec, build)


def training_frame(scores: Artifact, anchor: Artifact, cfg) -> pd.DataFrame:
    """The anchor's K trajectories per prompt, each joined with its prompt's frozen log Ẑ."""
    traj, _ = anchoring.select_trajectories(scores.read_table("scores"), int(cfg.proposal.num_samples), strength(cfg))
    table = anchor.read_table("anchor")[["prompt_id", "log_z_hat"]]
    return traj.merge(table, on="prompt_id", validate="many_to_one")


# -- 4. train -----------------------------------------------------------------------------
def stage_train(ctx: Context, scores: Artifact | None, anchor: Artifact | None) -> Artifact:
    """Train the policy with the chosen algorithm; Lightning checkpoints, resumable.

    Offline algorithms depend on the cached trajectories and the anchor; online ones on
    the task and the sampler settings they sample with instead.
    """
    cfg = ctx.cfg
    spec = {"init": ctx.backbone.ref_fingerprint,
            "algorithm": OmegaConf.to_container(cfg.algorithm, resolve=True),
            "trainer": {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                        if k in TRAINER_KEYS_THAT_MATTER},
            "seed": int(cfg.seed)}
    if cfg.algorithm.online:
        spec |= {"task": ctx.task.spec(), "sampler": SamplerSettings.from_cfg(cfg.sampler).spec()}
        if cfg.algorithm.loss == "flowrl" or cfg.algorithm.loss_args.get("kl_coef", 0):
            spec["reference"] = ctx.backbone.ref_fingerprint
    else:
        spec |= {"scores": scores.key, "anchor": anchor.key, "beta": float(cfg.beta)}

    def build(art: Artifact) -> dict:
        from disa.training.run import fit

        frame = None if cfg.algorithm.online else training_frame(scores, anchor, cfg)
        return fit(ctx, art, frame)

    return ctx.build("train", spec, build)


#: trainer settings that change the trained weights (devices and logging cadence do not)
TRAINER_KEYS_THAT_MATTER = ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")


# -- 5. evaluate --------------------------------------------------------------------------
def stage_evaluate(ctx: Context, name: str, model_path: str, fp: str) -> dict[str, Artifact]:
    """k samples per held-out prompt (and, on enumerable tasks, the exact rewarded-set
    log-probs) for one policy."""
    cfg = ctx.cfg
    settings = SamplerSettings.from_cfg(cfg.eval.sampler)
    spec = {"task": ctx.task.spec(), "model": fp, "dtype": ctx.backbone.dtype, "sampler": settings.spec(),
            "k": int(cfg.eval.k), "seed": int(cfg.seed), "split": cfg.eval.split,
            "batch_size": int(cfg.sampler.batch_size)}

    def build(art: Artifact) -> dict:
        model = ctx.backbone.load(model_path, ctx.device).eval()
        tok = load_tokenizer(model_path)
        prompts = ctx.task.prompts(cfg.eval.split)
        p_ids = [encode_prompt(tok, p, _chat(cfg)) for p in prompts.prompt]
        sampler = build_sampler(cfg)
        comps = sampler.sample(model, tok, p_ids, int(cfg.eval.k), settings, seed=int(cfg.seed) + 17)
        rows = [{"prompt_id": pid, "sample_idx": j, "text": completion_text(tok, c),
                 "n_tokens": len(c)} for pid, cs in zip(prompts.prompt_id, comps) for j, c in enumerate(cs)]
        samples = pd.DataFrame(rows)
        samples["reward"] = ctx.task.rewards(_prompt_rows(ctx.task, samples.prompt_id), samples.text.tolist())
        if "benchmark" in prompts:
            samples = samples.merge(prompts[["prompt_id", "benchmark"]], on="prompt_id", validate="many_to_one")
        art.write_table("samples", samples)
        return {"rows": len(samples), "policy": name}

    out = {"samples": ctx.build("evaluate", spec, build)}
    if hasattr(ctx.task, "rewarded_set"):
        out["rewarded"] = _rewarded_table(ctx, model_path, fp, ("evaluate",))
    return out


def policy_metrics(ctx: Context, arts: dict[str, Artifact], oracle: Artifact | None) -> dict[str, float]:
    """Evaluation metrics of one policy. Samples whose grading failed (NaN reward) are left
    out and counted in ``reward_missing``; with several benchmarks, every metric is also
    reported per benchmark (``{benchmark}.{metric}``) and macro-averaged (``macro.{metric}``)."""
    cfg = ctx.cfg
    samples = arts["samples"].read_table("samples")
    missing = samples.reward.isna()
    graded = samples[~missing]
    if graded.empty:
        raise ValueError("every evaluation sample failed grading; see the grader settings (task.grader)")
    sizes = None
    if oracle is not None:
        ref_table = oracle.read_table("rewarded")
        sizes = ref_table.groupby("prompt_id").size()
    m = evaluation.sample_metrics(graded, list(cfg.eval.pass_k), sizes)
    if "benchmark" in graded and graded.benchmark.nunique() > 1:
        per = {b: evaluation.sample_metrics(g, list(cfg.eval.pass_k)) for b, g in graded.groupby("benchmark")}
        for b, mb in per.items():
            m |= {f"{b}.{k}": v for k, v in mb.items()}
        for k in ("mean_at_k", *(f"pass_at_{j}" for j in cfg.eval.pass_k)):
            vals = [mb[k] for mb in per.values() if k in mb]
            if len(vals) == len(per):
                m[f"macro.{k}"] = float(sum(vals) / len(vals))
    if "rewarded" in arts and oracle is not None:
        test_ids = set(samples.prompt_id)
        pol = arts["rewarded"].read_table("rewarded")
        m |= evaluation.target_distances(pol[pol.prompt_id.isin(test_ids)],
                                         ref_table[ref_table.prompt_id.isin(test_ids)], float(cfg.beta))
    m["tokens_generated"] = int(samples.n_tokens.sum())
    m["reward_missing"] = int(missing.sum())
    return m


def judge_metrics(cfg, arts: dict[str, Artifact], task) -> dict[str, float]:
    """LLM-as-judge strategy diversity over each evaluation prompt's k responses (when
    ``eval.judge`` is set). Failed or unparsable judgements are counted in
    ``judge_missing`` and left out of the means; with none scored, no mean is reported."""
    from disa.judge import HFJudge, OpenAICompatibleJudge, judge_diversity, summarize_judgements

    j = cfg.eval.judge
    if j.kind == "openai":
        judge = OpenAICompatibleJudge(j.base_url, j.model, api_key_env=j.get("api_key_env", "OPENAI_API_KEY"))
    elif j.kind == "hf":
        judge = HFJudge(j.model)
    else:
        raise ValueError(f"eval.judge.kind={j.kind!r}; allowed: ['openai', 'hf']")
    samples = arts["samples"].read_table("samples")
    problems = task.prompts(cfg.eval.split).set_index("prompt_id")
    problem_col = "problem" if "problem" in problems else "prompt"
    items = [{"prompt_id": pid, "problem": problems.loc[pid, problem_col], "responses": g.text.tolist()}
             for pid, g in samples.groupby("prompt_id", sort=False)]
    table = judge_diversity(judge, items, max_chars_per_response=int(j.get("max_chars", 4000)),
                            workers=int(j.get("workers", 1)))
    s = summarize_judgements(table)
    out = {"judge_missing": s["n_missing"], "judge_scored": s["n_scored"]}
    if s["n_scored"]:
        out |= {"judge_score": s["mean_score"], "judge_distinct_fraction": s["mean_distinct_fraction"]}
    return out


def finite_or_raise(summary: dict[str, Any]) -> dict[str, Any]:
    """A NaN never goes into a result silently: refuse it, naming the keys."""
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite values in the run summary: {bad}")
    return summary
