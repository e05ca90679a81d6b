"""Stage 2, score: reward, ``log π_ref`` and ``log q_c`` under every component, per trajectory."""

from __future__ import annotations

import numpy as np
import pandas as pd

from disa import anchor as anchoring
from disa.cache import Artifact
from disa.sampling import SamplerSettings
from disa.stages.context import Context, shards
from disa.tokenization import load_tokenizer

#: trajectories per shard of the score stage (a resume point), in scoring batches
SHARD_BATCHES = 8


def run(ctx: Context, rollouts: dict[str, Artifact]) -> Artifact:
    """One table of every trajectory with ``reward``, ``logp_ref`` and ``logq_<component>``:
    the density each component *sampled* it with (temperature, top-k, top-p included)."""
    s = ctx.settings
    sampling = SamplerSettings.from_cfg(ctx.cfg.sampler)
    spec = {"rollouts": {c: a.key for c, a in rollouts.items()}, "task": ctx.task.spec(),
            "scorers": {c: ctx.fingerprint(c) for c in ["ref", *s.components]}, "dtype": ctx.backbone.dtype,
            "sampler": sampling.spec()}

    def build(art: Artifact) -> dict:
        frame = pd.concat([a.read_shards() for a in rollouts.values()], ignore_index=True)
        tok = load_tokenizer(ctx.backbone.ref_path)
        pieces = shards(len(frame), s.score_batch_size * SHARD_BATCHES)
        # one model in memory at a time: every trajectory is scored by π_ref, then by the proposal
        passes = [("ref", "logp_ref", SamplerSettings(max_new_tokens=sampling.max_new_tokens))]
        for comp in s.components:
            if not (comp == "ref" and sampling.is_identity):  # logq_ref == logp_ref then
                passes.append((comp, f"logq_{comp}", sampling))
        for comp, column, how in passes:
            model = None
            for i, rows in enumerate(pieces):
                if art.has_shard(i, prefix=column):
                    continue
                model = model or ctx.load_model(comp)
                part = frame.iloc[list(rows)]
                lp = _score(ctx, model, tok, part, how, desc=f"score {column} {i + 1}/{len(pieces)}")
                art.write_shard(i, pd.DataFrame({column: lp}), prefix=column)
            del model
        out = frame.copy()
        out["reward"] = ctx.grade(ctx.prompt_rows(out.prompt_id), out.text.tolist())["reward"].to_numpy()
        for _, column, _ in passes:
            out[column] = art.collect_shards(column)[column].to_numpy()
        if "logq_ref" not in out and "ref" in s.components:
            out["logq_ref"] = out["logp_ref"]
        out["n_tokens"] = out.completion_ids.map(len)
        anchoring.check_finite(out, ["reward", "logp_ref"])
        art.write_table("scores", out)
        art.remove_shards()
        return {"rows": len(out), "sampler_agreement": sampler_agreement(out)}

    art = ctx.build("score", spec, build)
    # Checked on a reused artifact too, and outside its key: a changed tolerance re-checks
    # without re-scoring.
    check_sampler_agreement(art.manifest().get("sampler_agreement", {}), ctx.cfg.sampler.get("logprob_tolerance"))
    return art


def _score(ctx: Context, model, tok, part: pd.DataFrame, how: SamplerSettings, desc: str) -> np.ndarray:
    from disa.scoring import sequence_logprobs

    return sequence_logprobs(
        model, part.prompt_ids.tolist(), part.completion_ids.tolist(), tok.pad_token_id,
        batch_size=ctx.settings.score_batch_size, temperature=how.temperature, top_k=how.top_k,
        top_p=how.top_p, chunk_size=ctx.settings.chunk_size, progress=desc,
    ).numpy()


def sampler_agreement(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per component, how far the sampling engine's own log-probs (``sampler_logprob``, where
    the engine reported them) are from the harness's scored ``logq_<component>``: the one
    source of truth for weights and losses is the scorer, and a large gap means the engine
    sampled from another model than the one scored (dtype, kernels, another checkpoint).
    Components without any reported value are left out, unless the scorer gives some of
    their samples probability 0 (``scorer_impossible``, then the gaps are NaN), so that the
    tolerance check sees them."""
    from disa.sampling.vllm import logprob_agreement

    if "sampler_logprob" not in scores:
        return {}
    out = {}
    for comp, g in scores.groupby("component", sort=True):
        agreement = logprob_agreement(g.sampler_logprob, g[f"logq_{comp}"], g.n_tokens)
        if agreement["compared"] > 0 or agreement["scorer_impossible"] > 0:
            out[str(comp)] = agreement
    return out


def check_sampler_agreement(agreement: dict[str, dict[str, float]], tolerance) -> None:
    """Refuse (``LogprobMismatch``) the scores of an engine whose own log-probs are further
    from the scorer's than ``sampler.logprob_tolerance`` nats per token (``None``: report
    only), naming the component, the measured gap and the tolerance."""
    from disa.sampling.vllm import check_agreement

    check_agreement(agreement, None if tolerance is None else float(tolerance))


def report(ctx: Context, scores: Artifact) -> dict:
    out = {"artifact.score": scores.key}
    for comp, agreement in scores.manifest().get("sampler_agreement", {}).items():
        out |= {f"score.sampler_{k}.{comp}": v for k, v in agreement.items()}
    return out
