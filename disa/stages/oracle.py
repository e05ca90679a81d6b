"""The exact oracle (tasks with an enumerable rewarded set): ``log π(o|q)`` of every rewarded
completion of every prompt, by teacher forcing. For π_ref it gives the exact log Z and p*;
for a trained policy, exact distances to p* (see :func:`disa.evaluation.target_distances`)."""

from __future__ import annotations

from collections.abc import Iterable

from disa.cache import Artifact
from disa.stages.context import Context
from disa.tokenization import load_tokenizer

#: the stages whose job builds π_ref's rewarded-set table: it is part of anchoring (exact
#: log Z), of training (a learned log Z_φ is logged against the exact log Z, and a train job's
#: anchor needs it) and of evaluation
BUILT_WITH = ("anchor", "train", "evaluate")


def enumerable(ctx: Context) -> bool:
    return hasattr(ctx.task, "rewarded_set")


def run(ctx: Context) -> Artifact | None:
    """π_ref's rewarded-set log-probs, or None on a task without an enumerable rewarded set."""
    if not enumerable(ctx):
        return None
    return rewarded_table(
        ctx, ctx.backbone.ref_path, ctx.backbone.ref_fingerprint, BUILT_WITH, label="oracle.ref"
    )


def ref_log_p_correct(oracle: Artifact | None):
    """π_ref's exact ``log P(correct|q)`` by prompt id, from the oracle's table (None without
    an oracle): the exact log Z of every prompt at any β (:func:`disa.anchor.exact_log_z`)."""
    if oracle is None:
        return None
    from disa.oracle import log_p_correct

    return log_p_correct(oracle.read_table("rewarded"))


def rewarded_table(
    ctx: Context, model_path: str, fp: str, built_with: Iterable[str], label: str
) -> Artifact:
    """The rewarded-set table (``prompt_id, answer, logp``) of the model in ``model_path``."""
    from disa.oracle import rewarded_logprobs

    spec = {
        "task": ctx.task.spec(),
        "model": fp,
        "dtype": ctx.backbone.dtype,
        "kind": "rewarded-set log-probs",
    }

    def build(art: Artifact) -> dict:
        model = ctx.load_model(model_path)
        table = rewarded_logprobs(
            model,
            load_tokenizer(model_path),
            ctx.task,
            ctx.prompts_all(),
            progress="teacher-force rewarded set",
        )
        art.write_table("rewarded", table)
        return {"rows": len(table)}

    return ctx.build("oracle", spec, build, built_with=built_with, label=label)
