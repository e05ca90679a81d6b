"""Stage 3, anchor: the frozen ``prompt → log Ẑ`` table with per-prompt diagnostics."""

from __future__ import annotations

import shutil

from disa import anchor as anchoring
from disa.cache import Artifact
from disa.stages.context import Context
from disa.stages.oracle import ref_log_p_correct


def run(ctx: Context, scores: Artifact, oracle: Artifact | None) -> Artifact:
    """Depends on β, K and λ (and the scores): cheap to recompute for every point of a sweep."""
    s = ctx.settings
    spec = {
        "scores": scores.key,
        "beta": s.beta,
        "K": s.num_samples,
        "strength": s.strength,
        "min_ess": s.min_ess,
        "oracle": oracle.key if oracle else None,
    }

    def build(art: Artifact) -> dict:
        lpc = ref_log_p_correct(oracle)
        table = anchoring.build_anchor(
            scores.read_table("scores", list(anchoring.SCORE_COLUMNS)),
            beta=s.beta,
            K=s.num_samples,
            strength=s.strength,
            min_ess=s.min_ess,
            log_p_correct=lpc,
        )
        table["proposal_kind"] = s.proposal_kind
        table["scores_key"] = scores.key
        art.write_table("anchor", table)
        return {"prompts": len(table)}

    return ctx.build("anchor", spec, build)


def report(ctx: Context, anchor: Artifact) -> dict:
    """The anchor's statistics; ``anchor.parquet`` is copied into the run directory."""
    shutil.copyfile(anchor.path / "anchor.parquet", ctx.run_dir / "anchor.parquet")
    return {
        "artifact.anchor": anchor.key,
        "proposal.strength_effective": ctx.settings.strength_effective,
        **anchoring.anchor_summary(anchor.read_table("anchor")),
    }
