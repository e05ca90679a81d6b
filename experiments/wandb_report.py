"""Build a W&B report (or a saved workspace view) comparing the baselines of one sweep.

    python experiments/wandb_report.py --project disa --group baselines            # report
    python experiments/wandb_report.py --project disa --group baselines --workspace
    python experiments/wandb_report.py --group baselines --dry-run                 # offline: print the spec

Panels (runs grouped by ``algorithm.name``, mean ± standard error over seeds): Mean@k,
pass@k for every k, diversity (unique correct answers, coverage of the rewarded set,
distinct-2), exact distance to the target p*, cost (wall time, generated tokens), the
training curves (loss; reward of the online algorithms), the logged sample completions and
a run comparer. The runs are those of ``--group`` (by default a multirun's sweep directory
name, or ``logger.wandb.group``; ``baselines`` for ``experiment=baselines``).

The layout is a plain dict (:func:`report_spec`) turned into ``wandb-workspaces`` objects by
:func:`build_report` / :func:`build_workspace`; neither talks to the server, only ``save``
does, so the construction is testable offline. Needs ``pip install wandb-workspaces``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

#: the W&B config key the runs are grouped by (the resolved config is logged nested)
GROUP_BY = "algorithm.name"
#: Lightning's W&B step metric
STEP = "trainer/global_step"


def report_spec(
    project: str,
    group: str | None = None,
    entity: str | None = None,
    pass_k: Sequence[int] = (1, 2, 4, 8, 16),
) -> dict[str, Any]:
    """The report's layout: title, run filter, grouping and panels (plain data)."""
    where = f"group {group!r}" if group else f"project {project!r}"
    return {
        "project": project,
        "entity": entity or "",
        "group": group,
        "title": f"Baselines: {group or project}",
        "description": f"DISA against FlowRL, GRPO, GSPO and LoRA-SFT: runs of {where}, grouped by "
        f"{GROUP_BY}, mean ± s.e. over seeds.",
        "groupby": GROUP_BY,
        "panels": [
            {
                "kind": "bar",
                "title": "Mean@k (policy vs π_ref)",
                "metrics": ["policy.mean_at_k", "ref.mean_at_k"],
            },
            {"kind": "bar", "title": "pass@k", "metrics": [f"policy.pass_at_{k}" for k in pass_k]},
            {
                "kind": "bar",
                "title": "Diversity",
                "metrics": ["policy.unique_correct", "policy.coverage", "policy.distinct_2"],
            },
            {
                "kind": "bar",
                "title": "Distance to the target p*",
                "metrics": [
                    "policy.tv_target",
                    "policy.kl_target",
                    "policy.tv_rewarded",
                    "policy.kl_rewarded",
                ],
            },
            {"kind": "bar", "title": "Cost", "metrics": ["train.wall_s", "train.tokens_generated"]},
            {"kind": "line", "title": "Training loss", "x": STEP, "y": ["train/loss"]},
            {
                "kind": "line",
                "title": "Reward during online training",
                "x": STEP,
                "y": ["train/reward_mean"],
            },
            {"kind": "table", "title": "Sample completions", "table": "eval_samples"},
            {"kind": "compare", "title": "Run comparer"},
        ],
    }


def _import_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise ImportError(
            "experiments/wandb_report.py needs wandb-workspaces: pip install wandb-workspaces "
            "(or the `sweeps` extra)"
        ) from e
    return wr, ws


def build_panels(spec: dict[str, Any]) -> list:
    """``wandb-workspaces`` panels for the spec's panel list."""
    wr, _ = _import_workspaces()
    by = wr.Config(spec["groupby"])
    grouped = {"groupby": by, "groupby_aggfunc": "mean", "groupby_rangefunc": "stderr"}
    panels = []
    for p in spec["panels"]:
        if p["kind"] == "bar":
            panels.append(
                wr.BarPlot(
                    title=p["title"], metrics=[wr.SummaryMetric(m) for m in p["metrics"]], **grouped
                )
            )
        elif p["kind"] == "line":
            panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), **grouped))
        elif p["kind"] == "table":
            panels.append(wr.WeavePanelSummaryTable(table_name=p["table"]))
        elif p["kind"] == "compare":
            panels.append(wr.RunComparer(diff_only="split"))
        else:
            raise ValueError(f"unknown panel kind {p['kind']!r}")
    return panels


def build_report(spec: dict[str, Any]):
    """A ``wandb_workspaces`` Report (not saved): title, description, one panel grid over
    the group's runs."""
    wr, _ = _import_workspaces()
    runset = wr.Runset(
        entity=spec["entity"],
        project=spec["project"],
        name=spec["group"] or spec["project"],
        filters=f"Group = '{spec['group']}'" if spec["group"] else "",
        groupby=[f"config.{spec['groupby']}"],
    )
    blocks = [
        wr.H1(spec["title"]),
        wr.P(spec["description"]),
        wr.PanelGrid(runsets=[runset], panels=build_panels(spec)),
    ]
    return wr.Report(
        project=spec["project"],
        entity=spec["entity"],
        title=spec["title"],
        description=spec["description"],
        blocks=blocks,
        width="fluid",
    )


def build_workspace(spec: dict[str, Any]):
    """A ``wandb_workspaces`` Workspace view (not saved) with the same panels."""
    _, ws = _import_workspaces()
    settings = ws.RunsetSettings(
        filters=[ws.Metric("Group") == spec["group"]] if spec["group"] else "",
        groupby=[ws.Config(spec["groupby"])],
    )
    return ws.Workspace(
        entity=spec["entity"],
        project=spec["project"],
        name=spec["title"],
        sections=[ws.Section(name="Baselines", panels=build_panels(spec), is_open=True)],
        runset_settings=settings,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--project", default=os.environ.get("WANDB_PROJECT", "disa"), help="W&B project"
    )
    ap.add_argument(
        "--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: yours)"
    )
    ap.add_argument(
        "--group", default=None, help="W&B group of the sweep (default: the whole project)"
    )
    ap.add_argument(
        "--pass-k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the k's of pass@k"
    )
    ap.add_argument(
        "--workspace", action="store_true", help="save a workspace view instead of a report"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print the spec and build it, without saving"
    )
    args = ap.parse_args(argv)

    spec = report_spec(args.project, args.group, args.entity, args.pass_k)
    if not args.dry_run and not spec["entity"]:
        import wandb

        spec["entity"] = wandb.Api().default_entity  # needs a login
    try:
        obj = build_workspace(spec) if args.workspace else build_report(spec)
    except ImportError as e:
        ap.error(str(e))
    if args.dry_run:
        print(json.dumps(spec, indent=2, ensure_ascii=False))
        print(
            f"# built a {type(obj).__name__} with {len(spec['panels'])} panels; not saved (--dry-run)"
        )
        return 0
    obj.save()
    print(obj.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
