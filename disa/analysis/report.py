"""The baselines comparison written into a sweep directory, and the Hydra callback that
writes it at the end of a multirun (``conf/experiment/baselines.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from disa.analysis.io import load_sweep
from disa.analysis.plots import plot_comparison
from disa.analysis.stats import COMPARISON_METRICS, comparison_table, mean_se


def write_comparison(sweep_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    df = load_sweep(sweep_dir)
    table = comparison_table(df)
    out = {ext: sweep_dir / f"comparison.{ext}" for ext in ("csv", "md", "png")}
    mean_se(df, ["algorithm"], COMPARISON_METRICS).to_csv(out["csv"], index=False)
    out["md"].write_text(_markdown(table) + "\n")
    plot_comparison(df, out["png"])
    return out


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
