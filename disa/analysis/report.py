"""The baselines comparison written into a sweep directory, and the Hydra callback that
writes it at the end of a multirun (``conf/experiment/baselines.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from disa.analysis.io import load_per_prompt, load_sweep, varying
from disa.analysis.plots import plot_comparison
from disa.analysis.stats import (
    COMPARISON_METRICS,
    PAIRED_COLUMNS,
    PAIRED_METRICS,
    REF_ARM,
    comparison_table,
    mean_se,
    paired_differences,
    paired_table,
    with_arms,
)

#: the arm every other algorithm is compared with, besides π_ref
BASELINE_ARM = "disa"


def write_comparison(sweep_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``sweep_dir``,
    and, where the runs wrote their per-prompt metrics, ``paired.csv``: every algorithm's paired
    difference from DISA and from π_ref, with its bootstrap CI over seeds × prompts
    (:func:`paired_comparisons`), also in ``comparison.md``."""
    sweep_dir = Path(sweep_dir)
    df = load_sweep(sweep_dir)
    table = comparison_table(df)
    out = {ext: sweep_dir / f"comparison.{ext}" for ext in ("csv", "md", "png")}
    mean_se(df, ["algorithm"], COMPARISON_METRICS).to_csv(out["csv"], index=False)
    text = "Mean ± s.e. over seeds\n\n" + _markdown(table) + "\n"
    diffs = paired_comparisons(sweep_dir)
    if diffs is not None:
        out["paired"] = sweep_dir / "paired.csv"
        diffs.to_csv(out["paired"], index=False)
        within = [c for c in diffs.columns if c not in PAIRED_COLUMNS]
        for key, part in diffs.groupby(within, sort=True) if within else [((), diffs)]:
            setting = ", ".join(
                f"{k}={v}" for k, v in zip(within, key if isinstance(key, tuple) else (key,))
            )
            for baseline in (BASELINE_ARM, REF_ARM):
                # π_ref − DISA: −(DISA − π_ref)
                rows = part[(part.baseline == baseline) & (part.arm != REF_ARM)]
                if len(rows):
                    text += (
                        f"\nPaired difference from {baseline}{f' ({setting})' if setting else ''}: per-prompt "
                        f"metrics, {int(rows.seeds.max())} seeds × {int(rows.prompts.max())} prompts, 95% "
                        "bootstrap CI over seeds and prompts, * where it excludes 0\n\n"
                        + _markdown(paired_table(rows))
                        + "\n"
                    )
    out["md"].write_text(text)
    plot_comparison(df, out["png"])
    return out


def paired_comparisons(
    sweep_dir: str | Path,
    by: str = "algorithm",
    baselines: tuple[str, ...] = (BASELINE_ARM, REF_ARM),
    metrics: tuple[str, ...] = PAIRED_METRICS,
) -> pd.DataFrame | None:
    """The arms of a sweep (each value of ``by``, and π_ref) against each of ``baselines`` that
    ran, paired by seed and prompt (:func:`disa.analysis.stats.paired_differences`), within each
    combination of the other settings the sweep varies (their columns are added); None for a
    sweep whose runs wrote no per-prompt metrics."""
    try:
        per_prompt = load_per_prompt(sweep_dir)
    except FileNotFoundError:
        return None
    # the realised λ is derived (and absent from online runs, which draw no proposal samples)
    within = [
        k
        for k in varying(load_sweep(sweep_dir))
        if k not in (by, "seed", "proposal.strength_effective")
    ]
    parts = []
    for key, group in (
        per_prompt.groupby(within, sort=True, dropna=False) if within else [((), per_prompt)]
    ):
        arms = with_arms(group, by)
        for baseline in (b for b in baselines if b in set(arms.arm)):
            diffs = paired_differences(arms, baseline, metrics)
            for k, v in zip(within, key if isinstance(key, tuple) else (key,)):
                diffs[k] = v
            parts.append(diffs)
    return pd.concat(parts, ignore_index=True) if parts else None


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep analysis importable alone
    Callback = object  # type: ignore[assignment,misc]


class ComparisonCallback(Callback):
    """Hydra callback: at the end of a multirun, write the comparison table of its jobs."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        out = write_comparison(config.hydra.sweep.dir)
        print(f"comparison written to {out['md']}")
