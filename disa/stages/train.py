"""Stage 4, train: the policy trained with the chosen algorithm; Lightning checkpoints, resumable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from disa import anchor as anchoring
from disa.cache import Artifact
from disa.sampling import SamplerSettings
from disa.stages.context import Context
from disa.stages.oracle import ref_log_p_correct

#: trainer settings that change the trained weights (devices and logging cadence do not)
TRAINER_KEYS_THAT_MATTER = (
    "max_steps",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
)


def run(
    ctx: Context, scores: Artifact | None, anchor: Artifact | None, oracle: Artifact | None
) -> Artifact:
    """Offline algorithms depend on the cached trajectories and the anchor; online ones on
    the task and the sampler settings they sample with instead (and on π_ref where their
    loss reads it). Every rank of a multi-process launch runs this build together.

    The ``oracle`` (enumerable tasks) gives the exact log Z of the training prompts, which a
    learned log Z_φ is compared with in the training logs; it changes no weight, so it is not
    part of the key."""
    from disa.training.run import fit

    s, cfg = ctx.settings, ctx.cfg
    spec = {
        "init": ctx.backbone.ref_fingerprint,
        "algorithm": OmegaConf.to_container(cfg.algorithm, resolve=True),
        "trainer": {
            k: v
            for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
            if k in TRAINER_KEYS_THAT_MATTER
        },
        "lr_schedule": OmegaConf.to_container(cfg.lr_schedule, resolve=True),
        "seed": s.seed,
    }
    if s.online:
        spec |= {"task": ctx.task.spec(), "sampler": SamplerSettings.from_cfg(cfg.sampler).spec()}
        if s.loads_reference:
            spec["reference"] = ctx.backbone.ref_fingerprint
    else:
        spec |= {"scores": scores.key, "anchor": anchor.key, "beta": s.beta}

    def build(art: Artifact) -> dict:
        log_z = exact_log_z(ctx, oracle)
        if s.online:
            return fit(ctx, art, None, log_z)
        data = training_data(ctx, scores, anchor)
        # the trajectories artifact's key
        return fit(ctx, art, data, log_z) | {"store": data.path.name}

    return ctx.build("train", spec, build, collective=True)


def training_data(ctx: Context, scores: Artifact, anchor: Artifact):
    """The anchor's K trajectories per prompt, memory-mapped from their store (the
    ``trajectories`` artifact, built once per scores, K and λ: a β sweep shares it), each
    with its prompt's frozen log Ẑ."""
    from disa.training.data import STORE_FORMAT, Trajectories, write_store

    s = ctx.settings
    spec = {
        "scores": scores.key,
        "K": s.num_samples,
        "strength": s.strength,
        "format": STORE_FORMAT,
    }

    def build(art: Artifact) -> dict:
        small = scores.read_table("scores", ["prompt_id", "component", "sample_idx"])
        traj, _ = anchoring.select_trajectories(
            small.assign(row=np.arange(len(small))), s.num_samples, s.strength
        )
        return write_store(art.path, scores.file_path("scores.parquet"), traj.row.to_numpy())

    store = ctx.build("trajectories", spec, build, built_with=("train",))
    log_z_hat = (
        anchor.read_table("anchor", ["prompt_id", "log_z_hat"]).set_index("prompt_id").log_z_hat
    )
    return Trajectories.open(store.path, log_z_hat)


def exact_log_z(ctx: Context, oracle: Artifact | None) -> pd.Series | None:
    """The exact log Z of every prompt at the run's β, by prompt id (None without an oracle)."""
    lpc = ref_log_p_correct(oracle)
    if lpc is None:
        return None
    return pd.Series(anchoring.exact_log_z(lpc.to_numpy(), ctx.settings.beta), index=lpc.index)


def report(ctx: Context, trained: Artifact) -> dict:
    """Training figures; the checkpoint and the trained policy are linked into the run directory."""
    info = trained.manifest()
    out = {"artifact.train": trained.key}
    # (offline algorithms) recorded when it was built, so a reuse reports it too
    if "store" in info:
        out["artifact.trajectories"] = info["store"]
    out |= {
        f"train.{k}": info[k]
        for k in ("wall_s", "steps", "resumed", "trajectories", "tokens_generated")
    }
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
