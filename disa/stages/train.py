"""Stage 4, train: the policy trained with the chosen algorithm; Lightning checkpoints, resumable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from disa import anchor as anchoring
from disa.cache import Artifact
from disa.sampling import SamplerSettings
from disa.stages.context import Context

#: trainer settings that change the trained weights (devices and logging cadence do not)
TRAINER_KEYS_THAT_MATTER = ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")


def run(ctx: Context, scores: Artifact | None, anchor: Artifact | None, oracle: Artifact | None) -> Artifact:
    """Offline algorithms depend on the cached trajectories and the anchor; online ones on
    the task and the sampler settings they sample with instead (and on π_ref where their
    loss reads it). Every rank of a multi-process launch runs this build together.

    The ``oracle`` (enumerable tasks) gives the exact log Z of the training prompts, which a
    learned log Z_φ is compared with in the training logs; it changes no weight, so it is not
    part of the key."""
    from disa.training.run import fit

    s, cfg = ctx.settings, ctx.cfg
    spec = {"init": ctx.backbone.ref_fingerprint,
            "algorithm": OmegaConf.to_container(cfg.algorithm, resolve=True),
            "trainer": {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                        if k in TRAINER_KEYS_THAT_MATTER},
            "lr_schedule": OmegaConf.to_container(cfg.lr_schedule, resolve=True),
            "seed": s.seed}
    if s.online:
        spec |= {"task": ctx.task.spec(), "sampler": SamplerSettings.from_cfg(cfg.sampler).spec()}
        if s.loads_reference:
            spec["reference"] = ctx.backbone.ref_fingerprint
    else:
        spec |= {"scores": scores.key, "anchor": anchor.key, "beta": s.beta}

    def build(art: Artifact) -> dict:
        frame = None if s.online else training_frame(ctx, scores, anchor)
        return fit(ctx, art, frame, exact_log_z(ctx, oracle))

    return ctx.build("train", spec, build, collective=True)


def training_frame(ctx: Context, scores: Artifact, anchor: Artifact) -> pd.DataFrame:
    """The anchor's K trajectories per prompt, each joined with its prompt's frozen log Ẑ."""
    s = ctx.settings
    traj, _ = anchoring.select_trajectories(scores.read_table("scores"), s.num_samples, s.strength)
    table = anchor.read_table("anchor")[["prompt_id", "log_z_hat"]]
    return traj.merge(table, on="prompt_id", validate="many_to_one")


def exact_log_z(ctx: Context, oracle: Artifact | None) -> pd.Series | None:
    """The exact log Z of every prompt at the run's β, by prompt id (None without an oracle)."""
    if oracle is None:
        return None
    from disa.oracle import log_p_correct

    lpc = log_p_correct(oracle.read_table("rewarded"))
    return pd.Series(anchoring.exact_log_z(lpc.to_numpy(), ctx.settings.beta), index=lpc.index)


def report(ctx: Context, trained: Artifact) -> dict:
    """Training figures; the checkpoint and the trained policy are linked into the run directory."""
    info = trained.manifest()
    out = {"artifact.train": trained.key}
    out |= {f"train.{k}": info[k] for k in ("wall_s", "steps", "resumed", "trajectories", "tokens_generated")}
    out |= {f"train.{k.removeprefix('train/')}": v for k, v in info["final"].items()}
    _link_checkpoint(trained.path, ctx.run_dir)
    return out


def _link_checkpoint(train_dir: Path, run_dir: Path) -> None:
    """Put the Lightning checkpoint and the trained policy in the run directory: hard links
    where the filesystem allows (free, even for large models), copies otherwise."""
    for src in [train_dir / "checkpoints" / "last.ckpt", *sorted((train_dir / "policy").glob("*"))]:
        dst = run_dir / ("checkpoints" if src.suffix == ".ckpt" else "policy") / src.name
        dst.parent.mkdir(exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
