"""The stage layer: every stage of a job declared once, and the plan ``stage=`` selects.

    oracle ─┐
    sample → score → anchor → [study] → train → evaluate

Each :class:`Stage` names the outputs of earlier stages it reads (``inputs``) and the one it
produces (``output``, a cached artifact or a small record of several), and has two
functions: ``run`` builds or reuses its artifacts, ``report`` (on the leader process only)
turns them into flat ``summary.json`` entries and puts its files into the run directory.
:func:`plan` picks the stages a job runs; :func:`run_plan` runs them in order. Each stage's
artifact is keyed by exactly the settings that determine it, so

- the rollouts do not depend on β, λ or the algorithm: a β or λ sweep samples once;
- the anchor depends on β, K and λ and is cheap to recompute;
- the evaluation of π_ref is shared by every run with the same evaluation settings.

A job with ``stage=<name>`` runs the stages up to that one and builds only that one's
artifact: the earlier ones must already be cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disa.stages import anchor, evaluate, oracle, sample, score, study, train
from disa.stages.context import Context, report_nothing, resolve_device

__all__ = [
    "CACHED_INPUTS",
    "PROPOSAL_STAGES",
    "STAGES",
    "STAGE_NAMES",
    "Context",
    "Stage",
    "plan",
    "resolve_device",
    "run_plan",
]


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  #: outputs of earlier stages passed to ``run``, in this order
    output: str  #: the name later stages read this one's result by
    run: Callable[..., Any]  #: ``run(ctx, *inputs) -> output``: build or reuse the artifacts
    report: Callable[[Context, Any], dict[str, Any]]  #: ``summary.json`` entries (leader only)


#: every stage, in the order a job runs them
STAGES: tuple[Stage, ...] = (
    Stage("oracle", (), "oracle", oracle.run, report_nothing),
    Stage("sample", (), "rollouts", sample.run, sample.report),
    Stage("score", ("rollouts",), "scores", score.run, score.report),
    Stage("anchor", ("scores", "oracle"), "anchor", anchor.run, anchor.report),
    Stage("study", ("scores", "oracle"), "study", study.run, study.report),
    Stage("train", ("scores", "anchor", "oracle"), "policy", train.run, train.report),
    Stage("evaluate", ("policy", "oracle"), "evaluation", evaluate.run, evaluate.report),
)
#: the values ``stage=`` may take besides ``all``: the stages a job can be asked to run alone
STAGE_NAMES = ("sample", "score", "anchor", "train", "evaluate")
#: the stages that draw and weigh the proposal's trajectories (online algorithms skip them)
PROPOSAL_STAGES = ("sample", "score", "anchor")
#: the stages whose artifacts a job asked for a later stage reuses rather than builds
CACHED_INPUTS = ("sample", "score", "anchor", "train")


def plan(
    stage: str,
    *,
    online: bool,
    study: bool = False,
    study_stops: bool = True,
    enumerable: bool = False,
    leader: bool = True,
) -> list[Stage]:
    """The stages a job runs, in order.

    - ``stage``: ``"all"`` or one of :data:`STAGE_NAMES`, the last stage run;
    - ``online``: the algorithm samples from its own policy, so no proposal rollouts and no
      anchor, unless a proposal stage is asked for explicitly;
    - ``study``: an analysis over the cached rollouts runs after the anchor; with
      ``study_stops`` it is the job (no training, no evaluation);
    - ``enumerable``: the task's rewarded set can be enumerated, so the exact oracle is
      computed, with any job that reaches the anchor;
    - ``leader``: False for a rank > 0 of a multi-process training, which stops after it.
    """
    order = [s.name for s in STAGES]
    last = "evaluate" if stage == "all" else stage
    if not leader and order.index(last) > order.index("train"):
        last = "train"
    if study and (last == "anchor" or (study_stops and order.index(last) > order.index("study"))):
        last = "study"  # a study runs with stage=anchor too
    names = order[: order.index(last) + 1]
    if online and stage not in PROPOSAL_STAGES:
        names = [n for n in names if n not in PROPOSAL_STAGES]
    if not study:
        names = [n for n in names if n != "study"]
    if not enumerable or "anchor" not in order[: order.index(last) + 1]:
        names = [n for n in names if n != "oracle"]
    return [s for s in STAGES if s.name in names]


def run_plan(ctx: Context, stages: list[Stage]) -> dict[str, Any]:
    """Run ``stages`` in order, each on the outputs of the earlier ones (a missing input, of a
    stage the plan left out, is None); return their reports merged (leader only)."""
    outputs: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for stage in stages:
        outputs[stage.output] = stage.run(ctx, *(outputs.get(name) for name in stage.inputs))
        if ctx.leader:
            summary |= stage.report(ctx, outputs[stage.output])
    return summary
