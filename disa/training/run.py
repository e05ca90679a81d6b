"""Fit a policy with Lightning inside a ``train`` artifact (checkpoints there, resumable).

Offline algorithms (DISA, LoRA-SFT) read the cached trajectories, memory-mapped
(:class:`disa.training.data.Trajectories`), through :class:`TrajectoryDataModule`; online
ones (FlowRL, GRPO, GSPO) sample from the current policy each step
(:mod:`disa.training.online`). Both build their batches in the loss batch schema from what
the registered loss reads (:mod:`disa.losses`); only an online loss that reads reference
log-probs (FlowRL; GRPO with a KL term) loads the reference model.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from disa.cache import Artifact
from disa.models import load_model
from disa.tokenization import load_tokenizer
from disa.training.checkpoints import (
    AtomicCheckpointIO,
    FiniteGuard,
    PoisonedCheckpointError,
    non_finite_tensors,
    verify_checkpoint,
)
from disa.training.console import StepProgressBar, route_lightning_logs
from disa.training.schedule import lr_scheduler


def fit(ctx, art: Artifact, data, log_z_exact: pd.Series | None = None) -> dict[str, Any]:
    """Train and save the policy as a transformers checkpoint in ``art.path / "policy"``.

    ``data`` holds the cached trajectories with their prompts' log Ẑ
    (:class:`disa.training.data.Trajectories`, offline algorithms) or is None (online
    ones). ``log_z_exact`` (exact log Z by prompt id, on an enumerable task) is what a learned
    log Z_φ head is compared with in the training logs. A killed run leaves
    ``checkpoints/last.ckpt``; the next run with the same settings finds the artifact
    incomplete and resumes from there.
    """
    cfg, s = ctx.cfg, ctx.settings
    alg = cfg.algorithm
    L.seed_everything(s.seed, workers=True, verbose=False)
    policy = load_model(ctx.backbone.ref_path, "float32").train()  # the trainer's precision casts
    # recompute layer activations in backward (transformers 5: activation_…)
    if cfg.checkpoint.activations:
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)(
            {"use_reentrant": False}
        )
    tok = load_tokenizer(ctx.backbone.ref_path)
    optimizer = instantiate(alg.optimizer)
    schedule = functools.partial(
        lr_scheduler,
        decay=str(cfg.lr_schedule.decay),
        warmup_steps=int(cfg.lr_schedule.warmup_steps),
        total_steps=int(cfg.trainer.max_steps),
    )
    # manual optimization clips in the online module
    trainer_overrides: dict[str, Any] = {"gradient_clip_val": None} if s.online else {}
    ckpt_dir = art.path / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        save_last=True,
        save_top_k=1,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps),
    )
    route_lightning_logs()
    callbacks = [checkpoint, _Progress(), FiniteGuard()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=ctx.loggers or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(art.path),
        enable_model_summary=False,
        **trainer_overrides,
    )
    sharded = _fsdp2(trainer)
    if alg.get("lora"):  # every algorithm, online ones included, trains the same adapters
        policy = _with_lora(policy, alg.lora)
    if s.online:
        if sharded:  # the sampler generates with the whole policy, which FSDP2 holds in shards
            raise ValueError(
                f"algorithm={alg.name} (online) cannot train under trainer.strategy=ModelParallelStrategy "
                "(FSDP2); allowed: an offline algorithm (disa, lora_sft), or trainer=ddp / trainer=fsdp"
            )
        module, data = _online(ctx, policy, tok, optimizer, schedule, log_z_exact)
    else:
        from disa.training.data import CACHE_FIELDS, TrajectoryDataModule
        from disa.training.module import PolicyModule

        missing = sorted(s.loss_spec.needs(s.loss_options) - set(CACHE_FIELDS))
        if missing:
            raise ValueError(
                f"algorithm.loss={s.loss!r} reads {missing}, which only a rollout of the current "
                f"policy gives; allowed: algorithm.online=true for this loss"
            )
        if sharded:  # the same module, its policy sharded by FSDP2 when Lightning configures it
            from disa.training.sharded import ShardedPolicyModule as module_class
        else:
            module_class = PolicyModule
        module = module_class(
            policy,
            s.loss_spec,
            s.loss_options,
            optimizer,
            s.chunk_size,
            s.logprob_impl,
            lr_schedule=schedule,
        )
        data = TrajectoryDataModule(
            data, s.train_batch_size, tok.pad_token_id, seed=s.derive_seed("train-batches")
        )

    last = ckpt_dir / "last.ckpt"
    resumed = last.exists()
    if resumed:  # a truncated or NaN checkpoint is refused by name, never trained on
        verify_checkpoint(last)
    t0 = time.perf_counter()
    if s.online:
        trainer.fit(module, train_dataloaders=data, ckpt_path=str(last) if resumed else None)
    else:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if resumed else None)
    wall = time.perf_counter() - t0
    # a collective under sharding: every rank calls it
    final = _trained_policy(ctx, trainer, module)
    if trainer.global_rank == 0:
        if last.exists():  # sealed into the artifact with it: whole and finite, or the build fails
            verify_checkpoint(last)
        bad = non_finite_tensors(dict(final.named_parameters()))
        if bad:  # never sealed into the cache
            raise PoisonedCheckpointError(
                f"the trained policy holds non-finite weights in {bad[:5]}; not saved"
            )
        if alg.get("lora"):
            final = final.merge_and_unload()  # evaluation loads a plain transformers model
        final.save_pretrained(art.path / "policy")
        tok.save_pretrained(art.path / "policy")
    # Counts come from the logged metrics: under ddp_spawn the training ran in other processes
    # and only the weights and callback metrics come back to this one.
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics = {
        k: v for k, v in logged.items() if k.startswith("train/") and k not in _Progress.KEYS
    }
    return {
        "wall_s": wall,
        "steps": int(logged.get("train/optimizer_steps", trainer.global_step)),
        "resumed": resumed,
        "trajectories": len(data.dataset) if not s.online else 0,
        "tokens_generated": int(
            logged.get("train/tokens_generated", getattr(module, "tokens_generated", 0))
        ),
        "final": metrics,
    }


class _Progress(L.Callback):
    """Logs the optimizer steps taken so far after every batch (the trainer's own counter
    stays in the training processes under ddp_spawn)."""

    KEYS = ("train/optimizer_steps", "train/tokens_generated")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log(
            "train/optimizer_steps",
            float(trainer.global_step),
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )


def _trained_policy(ctx, trainer: L.Trainer, module: L.LightningModule):
    """The trained policy as a whole, unsharded model on rank 0 (None on other ranks).

    Under DDP and ZeRO-1/2 every rank holds whole weights: that is ``module.policy``. Under
    FSDP (1 or 2) and ZeRO-3 each rank holds a shard, so the full state dict is gathered (a
    collective: every rank must call this) and loaded on rank 0 into a fresh, unsharded
    copy of the backbone.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        state = strategy.lightning_module_state_dict()  # state_dict_type=full: gathered on rank 0
    elif _fsdp2(trainer):
        from disa.training.sharded import gather_full_state

        state = gather_full_state(module)  # whole tensors on rank 0, {} elsewhere
    elif getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                if trainer.global_rank == 0
                else {}
            )
    else:
        return module.policy
    if trainer.global_rank != 0:
        return None
    return unsharded_policy(ctx.backbone.ref_path, ctx.cfg.algorithm, state)


def _fsdp2(trainer: L.Trainer) -> bool:
    """Whether the trainer shards the policy with FSDP2 (Lightning's ``ModelParallelStrategy``,
    ``trainer=fsdp2_cpu``): the module is then :class:`disa.training.sharded.ShardedPolicyModule`."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def unsharded_policy(ref_path, alg, module_state: dict[str, Any]):
    """A fresh copy of the backbone (with the LoRA adapters when the algorithm uses them)
    holding ``module_state``, a full state dict of the training module whose policy
    weights are under ``policy.``; other entries (FlowRL's log Z head) are left out."""
    prefix = "policy."
    state = {k[len(prefix) :]: v for k, v in module_state.items() if k.startswith(prefix)}
    policy = load_model(ref_path, "float32")
    if alg.get("lora"):
        policy = _with_lora(policy, alg.lora)
    missing, unexpected = policy.load_state_dict(state, strict=False)
    # Tied output weights may be stored once; anything else missing is a gather gone wrong.
    missing = [k for k in missing if k not in _tied_keys(policy)]
    if missing or unexpected:
        raise RuntimeError(
            f"gathered policy state does not match the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return policy


def _tied_keys(policy) -> set[str]:
    names = getattr(policy, "_tied_weights_keys", None) or []
    if isinstance(names, dict):  # transformers 5: {target: source}
        names = list(names)
    keys = set(names)
    for k in list(keys):  # LoRA wraps the model: the same keys behind the peft prefix
        keys.add(f"base_model.model.{k}")
    return keys if getattr(policy.config, "tie_word_embeddings", False) else set()


def _with_lora(policy, lora_cfg):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, config)


def _online(ctx, policy, tok, optimizer, schedule, log_z_exact: pd.Series | None):
    import torch

    from disa.sampling import SamplerSettings, build_sampler
    from disa.training.online import LogZHead, OnlinePolicyModule, prompt_loader

    cfg, s, alg = ctx.cfg, ctx.settings, ctx.cfg.algorithm
    ref = load_model(ctx.backbone.ref_path, "float32") if s.loads_reference else None
    head = None
    prompts = ctx.task.prompts("train")
    if "log_z" in s.loss_spec.needs(s.loss_options):  # the loss trains a log Z_φ(q) head (FlowRL)
        head = LogZHead(
            policy.config.hidden_size, int(alg.log_z_head.num_layers), float(alg.log_z_head.dropout)
        )
    calibrate = head is not None and log_z_exact is not None
    exact = torch.as_tensor(log_z_exact.loc[prompts.prompt_id].to_numpy()) if calibrate else None
    module = OnlinePolicyModule(
        policy,
        ref,
        tok,
        ctx.task,
        prompts,
        build_sampler(cfg),
        SamplerSettings.from_cfg(cfg.sampler),
        s.loss_spec,
        s.loss_options,
        optimizer,
        group_size=int(alg.group_size),
        updates_per_rollout=int(alg.updates_per_rollout),
        minibatch_size=s.train_batch_size,
        scale_rewards=str(alg.get("scale_rewards", "group")),
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        log_z_head=head,
        chunk_size=s.chunk_size,
        logprob_impl=s.logprob_impl,
        seed=s.seed,
        chat_template=s.chat_template,
        grade=ctx.rewards(),
        lr_schedule=schedule,
        log_z_exact=exact,
    )
    return module, prompt_loader(
        module, len(prompts), int(alg.prompts_per_step), s.derive_seed("rollout-prompts")
    )
