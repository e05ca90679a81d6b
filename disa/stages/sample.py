"""Stage 1, sample: K proposal trajectories per training prompt from every mixture component."""

from __future__ import annotations

import pandas as pd

from disa.cache import Artifact
from disa.sampling import SamplerSettings, build_sampler
from disa.stages.context import Context, shards
from disa.tokenization import completion_text, encode_prompt, load_tokenizer


def run(ctx: Context) -> dict[str, Artifact]:
    """One rollout artifact per component ("ref", "proposal"), written shard by shard.

    The spec holds neither β nor λ nor the algorithm: a β or λ sweep samples once.
    """
    s = ctx.settings
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    prompts = ctx.task.prompts("train")
    arts = {}
    for comp in s.components:
        # shard layout and batch size fix which random stream each sample comes from: a
        # resume with another layout must not mix two streams (duplicates, no error)
        spec = {"task": ctx.task.spec(), "split": "train", "model": ctx.fingerprint(comp),
                "dtype": ctx.backbone.dtype, "sampler": sampling.spec(), "K": s.num_samples, "seed": s.seed,
                "component": comp, "prompts_per_shard": s.prompts_per_shard, "batch_size": s.sample_batch_size}

        def build(art: Artifact, comp=comp) -> dict:
            from tqdm.auto import tqdm

            tok = load_tokenizer(ctx.backbone.ref_path)
            model = ctx.load_model(comp)
            sampler = build_sampler(ctx.cfg)
            for i, rows in enumerate(tqdm(shards(len(prompts), s.prompts_per_shard), desc=f"sample {comp}", leave=False)):
                if art.has_shard(i):  # resume: this shard was written by an earlier run
                    continue
                chunk = prompts.iloc[list(rows)]
                p_ids = [encode_prompt(tok, p, s.chat_template) for p in chunk.prompt]
                comps = sampler.sample(model, tok, p_ids, s.num_samples, sampling, seed=s.derive_seed("sample", comp, i))
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
            return {"sampler": sampling.spec(), "rows": len(prompts) * s.num_samples}

        arts[comp] = ctx.build("sample", spec, build, label=f"sample.{comp}")
    return arts


def report(ctx: Context, rollouts: dict[str, Artifact]) -> dict:
    return {f"artifact.sample.{c}": a.key for c, a in rollouts.items()}
