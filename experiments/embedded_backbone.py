"""Make the shipped embedded checkpoints: pre-train π_ref and the proposal with the recipe of
``conf/backbone/embedded.yaml`` (on the default task), measure them, and write them with
their ``recipe.json`` into ``disa/assets/embedded/``.

    python experiments/embedded_backbone.py            # = make embedded-backbone
    python experiments/embedded_backbone.py --check    # pre-train into a temp dir, compare with the shipped ones

``recipe.json`` records the recipe spec (what ``backbone.source=shipped`` checks a config
against), the machine and library versions, the pre-training time, each model's exact
P(correct) averaged over the training and the held-out prompts, and every file's SHA-256.

Float kernels differ between CPUs, so the recipe does not give the same bits everywhere;
``--check`` (and ``tests/test_backbone.py``, marked slow) accepts a fresh model whose exact
P(correct) is within :data:`QUALITY_TOLERANCE` of the shipped one's on every split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
#: the largest difference of a freshly pre-trained model's exact P(correct) (mean over the
#: prompts of a split) from the shipped model's that still counts as "the same quality": 2 ×
#: the largest sd across pre-training seeds measured for the shipped recipe (docs: README,
#: "The embedded default"), so a machine's float kernels pass and a broken recipe does not.
QUALITY_TOLERANCE = 0.03


def compose_cfg(*overrides: str):
    """The default config (the shipped recipe), pre-training here."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["backbone.source=pretrain", *overrides])


def quality(ref_path: str | Path, proposal_path: str | Path, task) -> dict[str, dict[str, float]]:
    """Exact P(correct) of π_ref and the proposal (teacher forcing over the rewarded set),
    averaged over the training and over the held-out prompts."""
    from disa.models import load_model
    from disa.oracle import log_p_correct, rewarded_logprobs
    from disa.tokenization import load_tokenizer

    out: dict[str, dict[str, float]] = {}
    for name, path in (("ref", ref_path), ("proposal", proposal_path)):
        model, tok = load_model(str(path)).eval(), load_tokenizer(str(path))
        out[name] = {}
        for split in ("train", "test"):
            prompts = task.prompts(split)
            p = np.exp(log_p_correct(rewarded_logprobs(model, tok, task, prompts)))
            out[name][split] = float(p.loc[prompts.prompt_id].mean())
    return out


def sha256_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for part in ("ref", "proposal")
        for p in sorted((root / part).rglob("*"))
        if p.is_file()
    }


def pretrain(cfg, out: Path) -> dict:
    """Pre-train with ``cfg``'s recipe into ``out`` and measure; returns the recipe record."""
    import torch
    import transformers

    from disa.models import embedded_recipe, pretrain_embedded
    from disa.tasks import build_task

    task = build_task(cfg)
    t0 = time.time()
    pretrain_embedded(cfg, task, out)
    seconds = time.time() - t0
    return {
        "spec": json.loads(json.dumps(embedded_recipe(cfg, task), default=str)),
        "command": "make embedded-backbone",
        "built_with": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        },
        "pretrain_s": round(seconds, 1),
        "p_correct": quality(out / "ref", out / "proposal", task),
        "sha256": sha256_files(out),
    }


def compare(fresh: dict, shipped: dict, tolerance: float = QUALITY_TOLERANCE) -> pd.DataFrame:
    """One row per model × split: the shipped and the fresh exact P(correct), and whether they
    agree within ``tolerance``."""
    rows = []
    for model, splits in shipped["p_correct"].items():
        for split, value in splits.items():
            new = fresh["p_correct"][model][split]
            rows.append(
                {
                    "model": model,
                    "split": split,
                    "shipped": value,
                    "fresh": new,
                    "difference": new - value,
                    "within": abs(new - value) <= tolerance,
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from disa.models import SHIPPED

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="compare a fresh pre-training with the shipped models"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=SHIPPED,
        help="where the checkpoints go (default: the package's)",
    )
    ap.add_argument(
        "overrides", nargs="*", help="config overrides (another recipe; only with --out elsewhere)"
    )
    args = ap.parse_args(argv)
    cfg = compose_cfg(*args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        record = pretrain(cfg, Path(tmp))
        print(json.dumps({k: record[k] for k in ("pretrain_s", "p_correct")}, indent=2))
        if args.check:
            table = compare(record, json.loads((SHIPPED / "recipe.json").read_text()))
            print(table.to_string(index=False))
            return 0 if table.within.all() else 1
        if args.overrides and args.out == SHIPPED:
            print(
                "refusing to ship a recipe other than the configured default; pass --out",
                file=sys.stderr,
            )
            return 2
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        for part in ("ref", "proposal"):
            shutil.copytree(Path(tmp) / part, args.out / part)
        (args.out / "recipe.json").write_text(
            json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
