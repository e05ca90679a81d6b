"""Re-run the README's embedded-default figures on this machine and say, figure by figure,
whether each falls inside the interval the README states.

    python experiments/check_reproduction.py                 # run the headline sweep here, then check
    python experiments/check_reproduction.py --sweep-dir D   # check an existing sweep of that command

The stated figures live in ``docs/figures/headline.json``, written from the reference sweep by
``--record``; the README's table is printed from that file by ``--markdown``:

    python run.py -m seed=0,1,2,3,4 hydra.sweep.dir=multirun/headline
    python run.py -m backbone.source=pretrain backbone.pretrain.seed=0,1,2 seed=0,1,2 \\
        hydra.sweep.dir=multirun/backbone_spread
    python experiments/check_reproduction.py --record multirun/headline --spread multirun/backbone_spread

Intervals. A figure that does not depend on the training seed (``EXACT``: π_ref's and p*'s
exact figures, functions of the shipped weights alone) must agree within ``EXACT_TOLERANCE``,
the size of float-kernel differences between CPUs. Every other figure is stated as the mean ±
s.e. over the n seeds of the sweep; a fresh mean over the same n seeds on another machine is a
second draw, so the check accepts ``mean ± t(0.975, n−1) · √2 · s.e.`` (the 95% interval of
the difference of two n-seed means, the s.e. estimated from n seeds), and never less than
``EXACT_TOLERANCE``. A figure that sat on its bound at every seed (the policy's pass@16 = 1)
has no measured spread, so the check asks that it stays there. A machine that reproduces the
runs bit for bit lands on the stated means exactly.

The spread across backbone pre-training seeds (``--spread``) is stated beside the figures for
whoever regenerates the backbone (``backbone.source=pretrain``): it is not part of the check,
which runs on the shipped backbone.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
HEADLINE = REPO / "docs" / "figures" / "headline.json"
SEEDS = (0, 1, 2, 3, 4)
#: the largest difference accepted on a figure that does not depend on the training seed
EXACT_TOLERANCE = 1e-3
#: the figures that do not depend on the training seed: exact sums over the rewarded sets of
#: the shipped π_ref and of p* (π_ref among correct answers is p* among them by definition)
EXACT = ("ref.p_correct_exact", "policy.p_correct_target", "ref.tv_target", "ref.tv_rewarded")

#: (summary key, row label, column) of the README's embedded-default table, in order
FIGURES = (
    ("ref.mean_at_k", "Mean@16", "π_ref"),
    ("policy.mean_at_k", "Mean@16", "DISA policy"),
    ("ref.pass_at_1", "pass@1", "π_ref"),
    ("policy.pass_at_1", "pass@1", "DISA policy"),
    ("ref.pass_at_4", "pass@4", "π_ref"),
    ("policy.pass_at_4", "pass@4", "DISA policy"),
    ("ref.pass_at_16", "pass@16", "π_ref"),
    ("policy.pass_at_16", "pass@16", "DISA policy"),
    ("ref.p_correct_exact", "exact P(correct)", "π_ref"),
    ("policy.p_correct_exact", "exact P(correct)", "DISA policy"),
    ("policy.p_correct_target", "exact P(correct)", "target p*"),
    ("ref.unique_correct", "unique correct answers per solved prompt", "π_ref"),
    ("policy.unique_correct", "unique correct answers per solved prompt", "DISA policy"),
    ("ref.coverage", "coverage of the rewarded set", "π_ref"),
    ("policy.coverage", "coverage of the rewarded set", "DISA policy"),
    ("ref.tv_target", "TV to p* (partition R ∪ rest)", "π_ref"),
    ("policy.tv_target", "TV to p* (partition R ∪ rest)", "DISA policy"),
    ("ref.tv_rewarded", "TV to p* among correct answers", "π_ref"),
    ("policy.tv_rewarded", "TV to p* among correct answers", "DISA policy"),
    ("anchor.mean_abs_error", "anchor: mean abs(log Ẑ − log Z)", "anchor"),
    ("anchor.mean_error", "anchor: mean (log Ẑ − log Z)", "anchor"),
    ("anchor.coverage_2se", "anchor: share of log Z in log Ẑ ± 2 s.e.", "anchor"),
    ("anchor.mean_ess_frac", "anchor: mean ESS/K", "anchor"),
)


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (scipy is not a dependency: bisection on the CDF by numerical
    integration of the density, ample for the few degrees of freedom used here)."""

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 20001)
        dens = (
            math.gamma((df + 1) / 2)
            / (math.sqrt(df * math.pi) * math.gamma(df / 2))
            * (1 + grid**2 / df) ** (-(df + 1) / 2)
        )
        return 0.5 + float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(grid)))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def load(sweep_dir: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]
    if not rows:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    return pd.DataFrame(rows)


def record(
    sweep_dir: Path, spread_dir: Path | None, command: str, spread_command: str | None
) -> dict:
    """The stated figures from the reference sweep (and the backbone spread)."""
    df = load(sweep_dir)
    n = len(df)
    t = t_quantile(n - 1)
    figures = {}
    for key, label, column in FIGURES:
        x = df[key].astype(float)
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        se = sd / math.sqrt(n)
        exact = key in EXACT
        half = EXACT_TOLERANCE if exact else max(t * math.sqrt(2) * se, EXACT_TOLERANCE)
        figures[key] = {
            "label": label,
            "column": column,
            "mean": mean,
            "se": se,
            "n": n,
            "kind": "exact" if exact else "seeded",
            "low": mean - half,
            "high": mean + half,
            "per_seed": x.tolist(),
        }
    out = {
        "command": command,
        "seeds": sorted(int(s) for s in df.seed),
        "t_quantile": t,
        "exact_tolerance": EXACT_TOLERANCE,
        "backbone.ref_fingerprint": sorted(set(df["backbone.ref_fingerprint"])),
        "measured": time.strftime("%Y-%m-%d"),
        "figures": figures,
    }
    if spread_dir is not None:
        sp = load(spread_dir)
        means = sp.groupby("backbone.pretrain_seed")[[k for k, _, _ in FIGURES]].mean()
        out["backbone_spread"] = {
            "command": spread_command,
            "backbone_seeds": [int(s) for s in means.index],
            "training_seeds": sorted(int(s) for s in set(sp.seed)),
            "sd": {k: float(means[k].std(ddof=1)) for k in means},
            "per_backbone": {k: means[k].tolist() for k in means},
        }
    return out


def check(stated: dict, sweep_dir: Path) -> tuple[list[dict], bool]:
    """This machine's figures against the stated intervals: one row per figure."""
    df = load(sweep_dir)
    rows, ok = [], True
    for key, f in stated["figures"].items():
        here = float(df[key].astype(float).mean())
        inside = f["low"] <= here <= f["high"]
        ok &= inside
        rows.append(
            {
                "figure": f["label"] if f["column"] == "anchor" else f"{f['column']}: {f['label']}",
                "stated": _stated(f),
                "interval": f"[{f['low']:.4f}, {f['high']:.4f}]",
                "here": f"{here:.4f}",
                "inside": "yes" if inside else "NO",
            }
        )
    return rows, ok


def _stated(f: dict) -> str:
    return (
        f"{f['mean']:.4f} (exact)" if f["kind"] == "exact" else f"{f['mean']:.4f} ± {f['se']:.4f}"
    )


def markdown(stated: dict) -> str:
    """The README's table: mean ± s.e. over the seeds, and the sd across backbone seeds."""
    spread = stated.get("backbone_spread", {}).get("sd", {})
    columns = ("π_ref", "DISA policy", "target p*")
    labels = list(
        dict.fromkeys(f["label"] for f in stated["figures"].values() if f["column"] in columns)
    )
    lines = [
        "| metric (held-out prompts) | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for label in labels:
        cells = []
        for column in columns:
            key = next(
                (
                    k
                    for k, f in stated["figures"].items()
                    if f["label"] == label and f["column"] == column
                ),
                None,
            )
            if key is None:
                cells.append("")
                continue
            f = stated["figures"][key]
            cell = (
                f"{f['mean']:.3f}" if f["kind"] == "exact" else f"{f['mean']:.3f} ± {f['se']:.3f}"
            )
            if key in spread:
                cell += f" ({spread[key]:.3f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    anchor = [(k, f) for k, f in stated["figures"].items() if f["column"] == "anchor"]
    lines.append("")
    lines.append("| anchor (training prompts) | mean ± s.e. | (sd across backbones) |")
    lines.append("| --- | --- | --- |")
    for key, f in anchor:
        lines.append(
            f"| {f['label'].removeprefix('anchor: ')} | {f['mean']:.3f} ± {f['se']:.3f} | "
            f"{spread.get(key, float('nan')):.3f} |"
        )
    return "\n".join(lines)


def run_sweep(sweep_dir: Path, cache_dir: str | None, seeds: tuple[int, ...]) -> None:
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "-m",
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep_dir}",
        "logger=csv",
    ]
    if cache_dir:
        cmd.append(f"cache_dir={cache_dir}")
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep-dir", type=Path, help="check this sweep instead of running one")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "multirun" / f"reproduction_{time.strftime('%Y%m%d_%H%M%S')}",
        help="where the sweep run here goes",
    )
    ap.add_argument("--cache-dir", help="cache_dir of the sweep run here (default: the harness's)")
    ap.add_argument(
        "--record", type=Path, help="write the stated figures from this reference sweep"
    )
    ap.add_argument(
        "--spread", type=Path, help="with --record: the backbone pre-training seed sweep"
    )
    ap.add_argument(
        "--markdown", action="store_true", help="print the README table of the stated figures"
    )
    args = ap.parse_args(argv)

    if args.record:
        stated = record(
            args.record,
            args.spread,
            "python run.py -m seed=0,1,2,3,4",
            "python run.py -m backbone.source=pretrain backbone.pretrain.seed=0,1,2 seed=0,1,2",
        )
        HEADLINE.write_text(json.dumps(stated, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {HEADLINE}")
        return 0
    stated = json.loads(HEADLINE.read_text())
    if args.markdown:
        print(markdown(stated))
        return 0
    sweep = args.sweep_dir
    if sweep is None:
        sweep = args.out
        run_sweep(sweep, args.cache_dir, tuple(stated["seeds"]))
    rows, ok = check(stated, sweep)
    here = sorted(set(load(sweep)["backbone.ref_fingerprint"]))
    print(f"\nstated: `{stated['command']}` (measured {stated['measured']}); here: {sweep}")
    print(
        f"π_ref fingerprint: stated {stated['backbone.ref_fingerprint']}, here {here} "
        f"({'the same weights' if here == stated['backbone.ref_fingerprint'] else 'OTHER WEIGHTS'})"
    )
    print(
        f"intervals: exact figures ± {stated['exact_tolerance']}; seeded ones mean ± t(0.975, "
        f"{len(stated['seeds']) - 1}) · √2 · s.e. = ± {stated['t_quantile'] * math.sqrt(2):.2f} s.e.\n"
    )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    inside = int((table.inside == "yes").sum())
    print(f"\n{inside} of {len(table)} figures inside their stated interval")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
