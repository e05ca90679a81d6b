"""Stage 1, sample: K proposal trajectories per training prompt from every mixture component."""

from __future__ import annotations

import pandas as pd

from disa.cache import Artifact
from disa.sampling import SamplerSettings, build_sampler
from disa.stages.context import Context, shards
from disa.tokenization import completion_text, encode_prompt, load_tokenizer


def run(ctx: Context) -> dict[str, Artifact]:
    """One rollout artifact per component ("ref", "proposal"), written shard by shard by the
    executor's workers (``executor=local``: this process).

    The spec holds neither β nor λ nor the algorithm: a β or λ sweep samples once. Each
    shard is seeded by its index, so which worker samples it does not change its bytes.
    """
    s = ctx.settings
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    n_prompts = len(ctx.task.prompts("train"))
    arts = {}
    for comp in s.components:
        # shard layout and batch size fix which random stream each sample comes from: a
        # resume with another layout must not mix two streams (duplicates, no error)
        spec = {
            "task": ctx.task.spec(),
            "split": "train",
            "model": ctx.fingerprint(comp),
            "dtype": ctx.backbone.dtype,
            "sampler": sampling.spec(),
            "K": s.num_samples,
            "seed": s.seed,
            "component": comp,
            "prompts_per_shard": s.prompts_per_shard,
            "batch_size": s.sample_batch_size,
        }

        def build(art: Artifact, comp=comp) -> dict:
            ctx.fill(art, fill, units(ctx), comp)
            return {"sampler": sampling.spec(), "rows": n_prompts * s.num_samples}

        arts[comp] = ctx.build("sample", spec, build, label=f"sample.{comp}")
    return arts


def units(ctx: Context) -> list[tuple[str, int]]:
    """The shards of a rollout artifact: ``sampler.prompts_per_shard`` prompts each."""
    return [
        ("part", i)
        for i in range(len(shards(len(ctx.task.prompts("train")), ctx.settings.prompts_per_shard)))
    ]


def fill(ctx: Context, art: Artifact, comp: str) -> int:
    """Write the missing shards of component ``comp``'s rollouts, together with any other
    workers; the model is loaded only if this worker gets a shard to sample."""
    from tqdm.auto import tqdm

    s = ctx.settings
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    prompts = ctx.task.prompts("train")
    pieces = shards(len(prompts), s.prompts_per_shard)
    engine: dict = {}
    todo = units(ctx)
    bar = tqdm(total=len(todo), desc=f"sample {comp}", leave=False)

    def make(prefix: str, i: int) -> pd.DataFrame:
        if not engine:
            engine.update(
                tok=load_tokenizer(ctx.backbone.ref_path),
                model=ctx.load_model(comp),
                sampler=build_sampler(ctx.cfg),
            )
        tok, sampler = engine["tok"], engine["sampler"]
        chunk = prompts.iloc[list(pieces[i])]
        p_ids = [encode_prompt(tok, p, s.chat_template) for p in chunk.prompt]
        comps = sampler.sample(
            engine["model"],
            tok,
            p_ids,
            s.num_samples,
            sampling,
            seed=s.derive_seed("sample", comp, i),
        )
        shard = pd.DataFrame(
            [
                {
                    "prompt_id": pid,
                    "component": comp,
                    "sample_idx": j,
                    "prompt_ids": p,
                    "completion_ids": c,
                    "text": completion_text(tok, c),
                    "finished": bool(c) and c[-1] == tok.eos_token_id,
                }
                for pid, p, cs in zip(chunk.prompt_id, p_ids, comps)
                for j, c in enumerate(cs)
            ]
        )
        # An engine that reports its own log-probs (vLLM) has them kept beside the
        # trajectories, for the consistency check of the score stage; they never enter a
        # weight or a loss.
        own = getattr(sampler, "last_logprobs", None)
        if own is not None:
            shard["sampler_logprob"] = [float(x) for group in own for x in group]
        bar.update()
        return shard

    try:
        return art.fill_shards(todo, make)
    finally:
        bar.close()


def report(ctx: Context, rollouts: dict[str, Artifact]) -> dict:
    return {f"artifact.sample.{c}": a.key for c, a in rollouts.items()}
