"""Stage 5, evaluate: k samples per held-out prompt for π_ref and for the trained policy
(and, on enumerable tasks, their exact rewarded-set log-probs), then the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from disa.cache import Artifact, spec_key
from disa.sampling import SamplerSettings, build_sampler
from disa.stages import oracle as oracle_stage
from disa.stages.context import Context
from disa.tokenization import completion_text, encode_prompt, load_tokenizer


@dataclass(frozen=True)
class Evaluation:
    #: "ref", "policy" → {"samples", and "rewarded" where enumerable}
    models: dict[str, dict[str, Artifact]]
    oracle: Artifact | None  #: π_ref's rewarded-set table: the exact target p*, where enumerable


def run(ctx: Context, trained: Artifact, oracle: Artifact | None) -> Evaluation:
    """The evaluation artifacts of π_ref and of the trained policy.

    π_ref's is shared by every run with the same evaluation settings; the policy's is keyed
    by the trained weights themselves, so a rebuilt train artifact never reuses an
    evaluation of other weights."""
    policy_fp = spec_key(
        {k: v["sha256"] for k, v in trained.manifest()["files"].items() if k.startswith("policy/")}
    )
    return Evaluation(
        {
            "ref": evaluate(ctx, "ref", ctx.backbone.ref_path, ctx.backbone.ref_fingerprint),
            "policy": evaluate(ctx, "policy", str(trained.path / "policy"), policy_fp),
        },
        oracle,
    )


def evaluate(ctx: Context, name: str, model_path: str, fp: str) -> dict[str, Artifact]:
    """k samples per held-out prompt for the model in ``model_path`` (fingerprint ``fp``)."""
    s, cfg = ctx.settings, ctx.cfg
    sampling = SamplerSettings.from_cfg(cfg.eval.sampler)
    spec = {
        "task": ctx.task.spec(),
        "model": fp,
        "dtype": ctx.backbone.dtype,
        "sampler": sampling.spec(),
        "k": s.eval_k,
        "seed": s.seed,
        "split": cfg.eval.split,
        "batch_size": s.sample_batch_size,
    }

    def build(art: Artifact) -> dict:
        model = ctx.load_model(model_path)
        tok = load_tokenizer(model_path)
        prompts = ctx.task.prompts(cfg.eval.split)
        p_ids = [encode_prompt(tok, p, s.chat_template) for p in prompts.prompt]
        comps = build_sampler(cfg).sample(
            model, tok, p_ids, s.eval_k, sampling, seed=s.derive_seed("evaluate")
        )
        rows = [
            {"prompt_id": pid, "sample_idx": j, "text": completion_text(tok, c), "n_tokens": len(c)}
            for pid, cs in zip(prompts.prompt_id, comps)
            for j, c in enumerate(cs)
        ]
        samples = pd.DataFrame(rows)
        # the reward, and the task's own columns (a code task's sandbox guards)
        grades = ctx.grade(ctx.prompt_rows(samples.prompt_id), samples.text.tolist())
        samples = pd.concat([samples, grades], axis=1)
        if "benchmark" in prompts:
            samples = samples.merge(
                prompts[["prompt_id", "benchmark"]], on="prompt_id", validate="many_to_one"
            )
        art.write_table("samples", samples)
        return {"rows": len(samples), "policy": name}

    out = {"samples": ctx.build("evaluate", spec, build, label=f"evaluate.{name}")}
    if oracle_stage.enumerable(ctx):
        out["rewarded"] = oracle_stage.rewarded_table(
            ctx, model_path, fp, ("evaluate",), label=f"oracle.{name}"
        )
    return out


def sandbox_guards(samples: pd.DataFrame, name: str) -> dict[str, bool]:
    """``{name}.sandbox.<guard>``: whether the guard confined every sandboxed run that
    graded these samples (code tasks; a sample without a run, e.g. no code, does not count)."""
    out = {}
    for col in (c for c in samples.columns if c.startswith("sandbox_")):
        ran = samples[col].dropna()
        if len(ran):
            out[f"{name}.sandbox.{col[len('sandbox_') :]}"] = bool(ran.astype(bool).all())
    return out


def report(ctx: Context, evaluation: Evaluation) -> dict:
    """``ref.*`` and ``policy.*`` metrics (and the judge's, with ``eval.judge``); the samples
    are copied into the run directory as ``eval_samples_{ref,policy}.parquet``, and the
    metrics prompt by prompt (``model`` "ref" or "policy") as ``eval_per_prompt.parquet``:
    what paired comparisons across runs resample (:func:`disa.analysis.paired_differences`)."""
    from disa.evaluation import per_prompt_metrics, policy_metrics

    cfg, out, per_prompt = ctx.cfg, {}, []
    reference = evaluation.oracle.read_table("rewarded") if evaluation.oracle is not None else None
    judge = None
    if cfg.eval.get("judge"):  # one judge for both models (an HF judge is a model load)
        from disa.judge import build_judge, judge_metrics

        judge = build_judge(cfg.eval.judge)
    for name, arts in evaluation.models.items():
        samples = arts["samples"].read_table("samples")
        with ctx.timed("evaluate"):
            rewarded = arts["rewarded"].read_table("rewarded") if "rewarded" in arts else None
            out |= {
                f"{name}.{k}": v
                for k, v in policy_metrics(
                    samples, list(cfg.eval.pass_k), ctx.settings.beta, rewarded, reference
                ).items()
            }
            out |= sandbox_guards(samples, name)
            if judge is not None:
                j = cfg.eval.judge
                scores = judge_metrics(
                    judge,
                    samples,
                    ctx.task.prompts(cfg.eval.split),
                    max_chars=int(j.get("max_chars", 4000)),
                    workers=int(j.get("workers", 1)),
                )
                out |= {f"{name}.{k}": v for k, v in scores.items()}
            table = per_prompt_metrics(
                samples, list(cfg.eval.pass_k), ctx.settings.beta, rewarded, reference
            )
            per_prompt.append(table.assign(model=name, split=str(cfg.eval.split)))
        samples.to_parquet(ctx.run_dir / f"eval_samples_{name}.parquet")
    pd.concat(per_prompt, ignore_index=True).to_parquet(
        ctx.run_dir / "eval_per_prompt.parquet", index=False
    )
    return out
