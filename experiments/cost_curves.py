"""How each stage's time and peak memory grow with work, on the embedded backbone, and what
that projects to at the paper's scale.

    python experiments/cost_curves.py                      # K = 8, 80, 800 (100×), workers, projection
    python experiments/cost_curves.py --quick              # K = 2, 20: a smoke test (minutes)
    python experiments/cost_curves.py --sections projection --gen-tok-s 20000

Sections:

- ``stages``: for each K of ``--ks`` (on the default task's 30 training prompts, λ = 0.5, so
  both mixture components sample K per prompt), every stage runs in its own ``run.py``
  process on a fresh cache holding only the backbone: ``stage=sample``, ``score``,
  ``anchor``, ``train``. Time is the stage's own wall time (``time.<stage>_s`` of the job's
  summary: the earlier stages' artifacts are only verified); peak memory is the process's
  maximum resident set (``wait4``). Training runs ``--train-steps`` steps: its start-up is
  everything outside ``fit`` (the trajectory store, the models, the trainer), its steady
  state the time per step inside it. Then ``t = a + b·n`` is fitted by least squares over
  the sizes, and the growth exponent between the two largest sizes is printed.
- ``workers``: the sample and score stages at the largest K, one prompt per sampling shard,
  with ``executor=local`` (this process, 1 thread), ``executor=ray`` with 1 worker and with 2 (1 CPU each): trajectories
  per second over the stage (Ray's start and the engines' loading included) and once the
  workers run (:func:`steady_rate`, from ``.shards.jsonl``).
- ``projection``: GPU-hours per stage of the paper's setting (a 7B model, 40k prompts,
  K = 64, 1k tokens) from per-GPU throughput anchors given on the command line (their
  sources are in docs/PERFORMANCE.md), and the wall time on N nodes of 8 GPUs.

Run it under ``flock /tmp/disa-cpu.lock`` on a shared machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: a shorter pre-training than the default (the cost of sampling does not depend on it)
BACKBONE = ("backbone.pretrain.ref_steps=300", "backbone.pretrain.proposal_steps=30")
STAGES = ("sample", "score", "anchor", "train")


def run_stage(cache: Path, run_dir: Path, stage: str, *overrides: str, threads: int = 2) -> dict:
    """``run.py stage=<stage>`` in a subprocess: its summary and its peak RSS in MiB."""
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        f"stage={stage}",
        "logger=none",
        f"cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *BACKBONE,
        *overrides,
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": str(threads),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary | {"wall_s": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}


def fit_linear(n: list[float], t: list[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b·n``: ``(a, b)``."""
    b, a = np.polyfit(np.asarray(n, float), np.asarray(t, float), 1)
    return float(a), float(b)


def stages_section(args, work: Path) -> list[dict]:
    seed_cache = work / "backbone-cache"
    if not (
        seed_cache / "backbone"
    ).exists():  # pre-train once; every size starts from a copy of it
        run_stage(seed_cache, work / "runs" / "backbone", "sample", "proposal.num_samples=1")
    rows = []
    for k in args.ks:
        cache = work / f"cache-K{k}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(seed_cache / "backbone", cache / "backbone")
        over = (
            f"proposal.num_samples={k}",
            f"trainer.max_steps={args.train_steps}",
            f"checkpoint.every_n_steps={args.train_steps}",
            "eval.k=1",
            "eval.pass_k=[1]",
        )
        for stage in STAGES:
            s = run_stage(cache, work / "runs" / f"K{k}-{stage}", stage, *over)
            trajectories = 2 * 30 * k  # both mixture components, 30 training prompts
            row = {
                "stage": stage,
                "K": k,
                "trajectories": trajectories,
                "time_s": s[f"time.{stage}_s"],
                "peak_rss_mib": s["peak_rss_mib"],
            }
            if stage == "train":
                row["trajectories"] = s["train.trajectories"]
                row["startup_s"] = s["time.train_s"] - s["train.wall_s"]
                row["step_s"] = s["train.wall_s"] / s["train.steps"]
                row["store_s"] = s.get("time.trajectories_s", 0.0)
            rows.append(row)
            print(
                f"K={k:4d} {stage:7s} n={row['trajectories']:6d} {row['time_s']:8.2f} s "
                f"peak {row['peak_rss_mib']:7.0f} MiB",
                flush=True,
            )
    print("\n| stage | K | trajectories | time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        extra = (
            (
                f" (start-up {r['startup_s']:.2f} s, of which store {r['store_s']:.2f} s; "
                f"{r['step_s'] * 1000:.1f} ms/step)"
            )
            if r["stage"] == "train"
            else ""
        )
        print(
            f"| {r['stage']} | {r['K']} | {r['trajectories']:,} | {r['time_s']:.2f}{extra} | {r['peak_rss_mib']:.0f} |"
        )
    print(
        "\n| stage | fit t = a + b·n: a (s) | b (ms per 1k trajectories) | growth exponent (two largest) "
        "| memory slope (MiB per 1k trajectories) |"
    )
    print("|---|---|---|---|---|")
    for stage in STAGES:
        sub = [r for r in rows if r["stage"] == stage]
        for label, key in (
            (stage, "time_s"),
            *(
                (("train start-up", "startup_s"), ("train step", "step_s"))
                if stage == "train"
                else ()
            ),
        ):
            n, t = [r["trajectories"] for r in sub], [r[key] for r in sub]
            a, b = fit_linear(n, t)
            p = (
                float(np.log(t[-1] / t[-2]) / np.log(n[-1] / n[-2]))
                if len(n) >= 2 and t[-2] > 0
                else float("nan")
            )
            _, m = fit_linear(n, [r["peak_rss_mib"] for r in sub])
            print(f"| {label} | {a:.2f} | {b * 1e6:.1f} | {p:.2f} | {m * 1e3:.2f} |")
    return rows


def workers_section(args, work: Path) -> list[dict]:
    k = args.ks[-1]
    seed_cache = work / "backbone-cache"
    rows = []
    for label, over, threads in (
        ("local, 1 process", ("executor=local",), 1),
        ("ray, 1 worker", ("executor=ray", "executor.workers=1"), 1),
        ("ray, 2 workers", ("executor=ray", "executor.workers=2"), 1),
    ):
        cache = work / "cache-workers"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(seed_cache / "backbone", cache / "backbone")
        for stage in ("sample", "score"):
            s = run_stage(
                cache,
                work / "runs" / f"workers-{label}-{stage}".replace(" ", "").replace(",", "-"),
                stage,
                f"proposal.num_samples={k}",
                "sampler.prompts_per_shard=1",  # 30 shards per component, to share out
                *over,
                threads=threads,
            )
            arts = [p for p in (cache / stage).iterdir() if (p / "manifest.json").exists()]
            journals = [
                [json.loads(ln) for ln in (a / ".shards.jsonl").read_text().splitlines()]
                for a in arts
            ]
            n = 2 * 30 * k
            # artifacts are filled one after the other (the sample stage: one per component),
            # and the score stage writes one shard per column (reward, log π_ref, log q)
            steady_s = sum(sum(e["rows"] for e in j) / steady_rate(j) for j in journals)
            rows.append(
                {
                    "executor": label,
                    "stage": stage,
                    "trajectories": n,
                    "stage_s": s[f"time.{stage}_s"],
                    "per_s": n / s[f"time.{stage}_s"],
                    "steady_per_s": n / steady_s,
                    "writers": max(len({e["pid"] for e in j}) for j in journals),
                }
            )
            print(rows[-1], flush=True)
    print(
        "\n| stage | executor | trajectories | stage time (s) | trajectories/s (stage) | "
        "trajectories/s (steady, after each worker's first shard) | processes that wrote shards |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['executor']} | {r['trajectories']:,} | {r['stage_s']:.1f} | {r['per_s']:.0f} | "
            f"{r['steady_per_s']:.0f} | {r['writers']} |"
        )
    return rows


def steady_rate(journal: list[dict]) -> float:
    """Rows per second of the workers of one artifact once running: per worker, the rows of
    its shards after its first one (which includes loading the engine) over the time from
    that first shard's end to its last shard's end, summed over the workers."""
    rate = 0.0
    for pid in {e["pid"] for e in journal}:
        mine = sorted((e for e in journal if e["pid"] == pid), key=lambda e: e["done"])
        if len(mine) > 1 and mine[-1]["done"] > mine[0]["done"]:
            rate += sum(e["rows"] for e in mine[1:]) / (mine[-1]["done"] - mine[0]["done"])
    return rate


def projection_section(args) -> list[dict]:
    """GPU-hours per stage at the paper's setting; see docs/PERFORMANCE.md for the anchors."""
    T = args.prompts * args.k  # trajectories per component, and the training set
    sampled = args.components * T
    seq = args.prompt_tokens + args.completion_tokens
    flops_per_s = args.peak_tflops * 1e12
    stages = {
        "sample": sampled * args.completion_tokens / args.gen_tok_s,
        "score": args.score_passes
        * sampled
        * seq
        * 2
        * args.params
        / (args.mfu_score * flops_per_s),
        "anchor": 0.0,  # CPU, below
        "train": args.epochs * T * seq * 6 * args.params / (args.mfu_train * flops_per_s),
    }
    anchor_cpu_s = sampled / args.anchor_rows_s
    total = sum(stages.values())
    print(
        f"\nPaper setting: {args.prompts:,} prompts × K={args.k} × {args.components} component(s) = "
        f"{sampled:,} sampled trajectories of {args.completion_tokens} tokens "
        f"({sampled * args.completion_tokens / 1e9:.2f}G generated tokens), prompts of {args.prompt_tokens} tokens, "
        f"{args.params / 1e9:.1f}B parameters; training {args.epochs:g} pass(es) over {T:,} trajectories."
    )
    print(
        "\n| stage | GPU-hours | share | "
        + " | ".join(f"wall on {n} node(s) × {args.gpus_per_node} GPUs" for n in args.nodes)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(args.nodes))
    rows = []
    for stage, seconds in stages.items():
        gpu_h = seconds / 3600
        walls = [seconds / (n * args.gpus_per_node) / 3600 for n in args.nodes]
        if stage == "anchor":
            print(
                f"| anchor | 0 (CPU: {anchor_cpu_s:.0f} s on one core) | 0% | "
                + " | ".join("–" for _ in walls)
                + " |"
            )
        else:
            print(
                f"| {stage} | {gpu_h:,.0f} | {seconds / total:.0%} | "
                + " | ".join(f"{w:.1f} h" for w in walls)
                + " |"
            )
        rows.append({"stage": stage, "gpu_hours": gpu_h, "share": seconds / total})
    print(
        f"| total | {total / 3600:,.0f} | 100% | "
        + " | ".join(f"{total / (n * args.gpus_per_node) / 3600:.1f} h" for n in args.nodes)
        + " |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sections", default="stages,workers,projection")
    ap.add_argument(
        "--ks", default="8,80,800", help="K per component at each size (30 prompts each)"
    )
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="K = 2, 20 and 10 training steps")
    ap.add_argument("--workdir", default="outputs/cost_curves")
    ap.add_argument("--out", default="outputs/cost_curves/cost_curves.json")
    g = ap.add_argument_group("projection (docs/PERFORMANCE.md gives each anchor's source)")
    g.add_argument("--prompts", type=int, default=40_000)
    g.add_argument("--k", type=int, default=64)
    g.add_argument(
        "--components", type=int, default=2, help="mixture components sampled K each (λ ∈ (0,1): 2)"
    )
    g.add_argument("--completion-tokens", type=int, default=1000)
    g.add_argument("--prompt-tokens", type=int, default=256)
    g.add_argument("--params", type=float, default=7.6e9, help="Qwen2.5-7B")
    g.add_argument(
        "--gen-tok-s",
        type=float,
        default=5500,
        help="generated tokens/s per GPU (vLLM, 7-8B, H100)",
    )
    g.add_argument(
        "--score-passes",
        type=int,
        default=2,
        help="log π_ref and log q_proposal (identity sampling)",
    )
    g.add_argument("--mfu-score", type=float, default=0.4)
    g.add_argument("--mfu-train", type=float, default=0.4)
    g.add_argument("--peak-tflops", type=float, default=989, help="H100/H200 dense bf16")
    g.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the K·prompts training trajectories"
    )
    g.add_argument(
        "--anchor-rows-s", type=float, default=0.27e6, help="build_anchor rows/s on one CPU core"
    )
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--nodes", default="1,4,16")
    args = ap.parse_args()
    args.ks = [int(k) for k in (("2,20" if args.quick else args.ks).split(","))]
    args.train_steps = 10 if args.quick else args.train_steps
    args.nodes = [int(n) for n in args.nodes.split(",")]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    result = {"args": {k: v for k, v in vars(args).items()}}
    if "stages" in sections:
        result["stages"] = stages_section(args, work)
    if "workers" in sections:
        result["workers"] = workers_section(args, work)
    if "projection" in sections:
        result["projection"] = projection_section(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
