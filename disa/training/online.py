"""Online training for FlowRL, GRPO and GSPO: each step samples groups from the current policy.

One ``training_step`` is one *rollout*: ``prompts_per_step`` training prompts, ``group_size``
completions each, sampled from the current policy through the sampler interface; then the
old-policy log-probs (and, for the algorithms that need them, the reference log-probs) by
forward passes; then ``updates_per_rollout`` optimizer steps over minibatches of that
rollout (so that importance ratios and clipping actually act). ``trainer.max_steps`` counts
optimizer steps, exactly as for the offline algorithms, which is what makes the comparison
fair in gradient updates; generated tokens are counted and logged beside it.

A sampler that draws from its own copy of the weights (``sampler=vllm``) is given the
policy's current weights before every rollout whose weights changed since the last one it
was given (``sampler.sync``: after each rollout's updates, and once at the start, which also
covers a resumed policy); the time this takes is logged as ``train/weight_sync_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from disa.losses import LossSpec, group_normalize
from disa.sampling import SamplerSettings
from disa.scoring import Batch, decoder_and_head, pack, token_logprobs
from disa.settings import derive_seed
from disa.tokenization import completion_text, encode_prompt
from disa.training.module import with_schedule
from disa.training.schedule import current_lr

log = logging.getLogger(__name__)


class LogZHead(torch.nn.Module):
    """FlowRL's learned ``log Z_φ(q)``: an MLP on the policy's last hidden states, mean-pooled
    over the prompt positions. ``num_layers − 1`` blocks of Linear-GELU-LayerNorm-Dropout,
    then ``Linear(H, 1)``."""

    def __init__(self, hidden_size: int, num_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        blocks: list[torch.nn.Module] = []
        for _ in range(num_layers - 1):
            blocks += [
                torch.nn.Linear(hidden_size, hidden_size),
                torch.nn.GELU(),
                torch.nn.LayerNorm(hidden_size),
                torch.nn.Dropout(dropout),
            ]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(hidden_size, 1))

    def forward(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, P, H], prompt_mask [B, P] → log Z [B]."""
        m = prompt_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, H]
        return self.net(pooled).squeeze(-1)


class OnlinePolicyModule(L.LightningModule):
    """Policy (+ FlowRL's log Z head) trained with manual optimization over online rollouts."""

    def __init__(
        self,
        policy: torch.nn.Module,
        ref: torch.nn.Module | None,
        tokenizer,
        task,
        prompts: pd.DataFrame,
        sampler,
        settings: SamplerSettings,
        loss: LossSpec,
        options: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        group_size: int,
        updates_per_rollout: int,
        minibatch_size: int,
        scale_rewards: str = "group",
        gradient_clip_val: float | None = 1.0,
        log_z_head: LogZHead | None = None,
        chunk_size: int = 2048,
        logprob_impl: str = "chunked",
        seed: int = 0,
        chat_template: bool = False,
        grade: Callable[[pd.DataFrame, list[str]], np.ndarray] | None = None,
        lr_schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
        | None = None,
        log_z_exact: torch.Tensor | None = None,
    ):
        """``lr_schedule`` builds the optimizer's learning-rate scheduler (None: constant).
        With a ``log_z_head`` and ``log_z_exact [n_prompts]`` (the exact log Z of every training
        prompt at the run's β, on an enumerable task), the head's log Z_φ of every training
        prompt is compared with it at every logging step (:meth:`log_z_calibration`)."""
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.log_z_head = log_z_head
        # The frozen reference is kept out of the module's state dict (and checkpoints).
        self._ref = [ref.eval().requires_grad_(False)] if ref is not None else []
        self.tok, self.task, self.prompts = tokenizer, task, prompts.reset_index(drop=True)
        self.prompt_ids = [encode_prompt(tokenizer, p, chat_template) for p in self.prompts.prompt]
        self.sampler, self.settings = sampler, settings
        self.loss, self.options = loss, options
        self.needs = loss.needs(options)  # the batch fields each update builds
        self.optimizer_factory, self.lr_schedule = optimizer, lr_schedule
        self.log_z_exact = log_z_exact
        self.group_size, self.updates, self.minibatch = (
            group_size,
            updates_per_rollout,
            minibatch_size,
        )
        self.scale_rewards, self.clip = scale_rewards, gradient_clip_val
        self.chunk_size, self.logprob_impl, self.seed = chunk_size, logprob_impl, seed
        #: rewards of completions (prompt rows, texts) → float array, NaN for a grading failure
        self.grade = grade or task.rewards
        self.tokens_generated = 0
        #: rollouts sampled so far (each reads the next batch of the prompt stream), and groups
        #: dropped for a missing reward; both saved in checkpoints
        self.rollouts_done = 0
        self.groups_dropped = 0
        #: the optimizer step whose weights the sampler last received (None: not yet)
        self._synced_step: int | None = None
        self.weight_sync_seconds = 0.0

    @property
    def ref(self) -> torch.nn.Module | None:
        return self._ref[0] if self._ref else None

    def on_fit_start(self) -> None:
        if self.ref is not None:
            self.ref.to(self.device)

    # -- rollout ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_index: list[int]) -> dict[str, torch.Tensor] | None:
        """Sample a group per prompt from the current policy; score old/ref log-probs.

        A group with a missing reward (NaN: the grader timed out or failed) is dropped whole
        and counted (``train/groups_dropped``): its advantages and FlowRL's r̂ are statistics
        of the whole group, which a missing member would change, and a 0 in its place would
        teach the policy that the answer was wrong. None when every group was dropped (no
        update from this rollout)."""
        self.policy.eval()
        self.sync_sampler()
        p_ids = [self.prompt_ids[i] for i in prompt_index]
        # Ranks sample different prompts (their share of the step's batch) and, with their
        # own seed stream, would draw different groups even for the same prompt.
        seed = derive_seed(self.seed, "rollout", int(self.global_step), self.global_rank)
        groups = self.sampler.sample(
            self.policy, self.tok, p_ids, self.group_size, self.settings, seed
        )
        self.rollouts_done += 1
        self.tokens_generated += self._all_ranks(sum(len(c) for g in groups for c in g))
        rows = self.prompts.iloc[np.repeat(prompt_index, self.group_size)]
        texts = [completion_text(self.tok, c) for g in groups for c in g]
        reward = np.asarray(self.grade(rows, texts), dtype=np.float64).reshape(
            len(groups), self.group_size
        )
        keep = ~np.isnan(reward).any(axis=1)  # [groups]
        if not keep.all():
            dropped = self.prompts.prompt_id.iloc[
                [i for i, k in zip(prompt_index, keep) if not k]
            ].tolist()
            self.groups_dropped += int((~keep).sum())
            log.warning(
                "rollout %d: dropped %d group(s) with a missing reward (prompts %s)",
                self.rollouts_done,
                int((~keep).sum()),
                dropped[:10],
            )
            if not keep.any():
                return None
            groups = [g for g, k in zip(groups, keep) if k]
            p_ids = [p for p, k in zip(p_ids, keep) if k]
            reward = reward[keep]
        completions = [c for g in groups for c in g]
        prompts_rep = [p for p in p_ids for _ in range(self.group_size)]
        batch = pack(prompts_rep, completions, self.tok.pad_token_id).to(self.device)
        out = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "completion_mask": batch.completion_mask,
            "reward": torch.as_tensor(reward.reshape(-1), dtype=torch.float32, device=self.device),
            "group_ids": torch.arange(len(p_ids), device=self.device).repeat_interleave(
                self.group_size
            ),
        }
        mask = batch.completion_mask.to(torch.float32)
        out["logp_old_tok"] = self._logprobs(self.policy, batch)  # [N, T]
        out["logp_old_seq"] = (out["logp_old_tok"] * mask).sum(-1)  # [N]
        if self.ref is not None:
            out["logp_ref_tok"] = self._logprobs(self.ref, batch)
            out["logp_ref_seq"] = (out["logp_ref_tok"] * mask).sum(-1)
        out["advantages"] = group_normalize(out["reward"], out["group_ids"], self.scale_rewards)
        self.policy.train()
        return out

    def sync_sampler(self) -> None:
        """Give a sampler that holds its own copy of the weights (vLLM) the current policy's,
        once per optimizer step: a rollout samples from the policy it trains."""
        sync = getattr(self.sampler, "sync", None)
        step = int(self.global_step)
        if sync is None or self._synced_step == step:
            return
        self.weight_sync_seconds += float(sync(self.policy))
        self._synced_step = step

    def _all_ranks(self, count: int) -> int:
        """``count`` summed over the ranks (tokens generated are a property of the whole run)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return count
        return int(
            trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum")
        )

    # -- updates ----------------------------------------------------------------------------
    def loss_inputs(
        self, roll: dict[str, torch.Tensor], idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(logp, mask, batch)`` of the rollout rows ``idx`` for one update: the current
        policy's token log-probs, with grad, and the fields of the loss batch schema that the
        loss reads (``log_z`` from the head, the rest from the rollout)."""
        tokens = Batch(
            roll["input_ids"][idx],
            roll["attention_mask"][idx],
            roll["position_ids"][idx],
            roll["completion_mask"][idx],
        )
        batch = {k: roll[k][idx] for k in self.needs if k != "log_z"}
        if "log_z" not in self.needs:
            return self._logprobs(self.policy, tokens), tokens.completion_mask, batch
        logp, hidden = self._logprobs(self.policy, tokens, return_hidden=True)
        P = tokens.prompt_len
        batch["log_z"] = self.log_z_head(hidden[:, :P].float(), tokens.attention_mask[:, :P])
        return logp, tokens.completion_mask, batch

    def _logprobs(self, model, tokens: Batch, return_hidden: bool = False):
        """:func:`disa.scoring.token_logprobs` with this module's settings: the old-policy,
        reference and policy passes of an update share one backend, so ratios start at 1."""
        return token_logprobs(
            model,
            tokens,
            chunk_size=self.chunk_size,
            impl=self.logprob_impl,
            return_hidden=return_hidden,
        )

    def minibatch_index(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Rows of a random minibatch made of *whole groups*, so that group statistics (the
        advantage, FlowRL's r̂ inside its loss) are those of the complete rollout group."""
        n_groups = n // self.group_size
        take = max(1, min(n_groups, self.minibatch // self.group_size))
        groups = torch.randperm(n_groups, generator=g)[:take]
        return (groups[:, None] * self.group_size + torch.arange(self.group_size)).flatten()

    def training_step(self, prompt_index: torch.Tensor, batch_idx: int) -> None:
        roll = self.rollout(prompt_index.tolist())
        self.log("train/groups_dropped", float(self.groups_dropped), batch_size=1)
        if roll is None:
            return
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        n = roll["input_ids"].shape[0]
        g = torch.Generator().manual_seed(
            derive_seed(self.seed, "minibatches", int(self.global_step))
        )
        logged: list[dict[str, float]] = []
        for _ in range(self.updates):
            if self.global_step >= self.trainer.max_steps:
                break
            idx = self.minibatch_index(n, g).to(self.device)
            logp, mask, batch = self.loss_inputs(roll, idx)
            loss, metrics = self.loss(logp, mask, batch, self.options)
            lr = current_lr(opt)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.clip:
                self.clip_gradients(
                    opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm"
                )
            opt.step()
            if scheduler is not None:  # manual optimization: Lightning leaves the stepping to us
                scheduler.step()
            logged.append({**metrics, "loss": float(loss.detach()), "lr": lr})
        # Lightning allows one value per key per training_step: log the mean over the updates.
        if logged:
            self.log_dict(
                {f"train/{k}": float(np.mean([m[k] for m in logged])) for k in logged[0]},
                batch_size=n,
                prog_bar=False,
            )
        # Lightning writes a training step's logs when its count of training steps (rollouts,
        # this one included) is a multiple of trainer.log_every_n_steps: the calibration is
        # computed for those steps only
        if (
            self.log_z_exact is not None
            and self.rollouts_done % max(1, self.trainer.log_every_n_steps) == 0
        ):
            self.log_dict(
                {f"train/{k}": v for k, v in self.log_z_calibration().items()}, batch_size=n
            )
        self.log("train/reward_mean", roll["reward"].mean(), batch_size=n, sync_dist=True)
        self.log("train/tokens_generated", float(self.tokens_generated), batch_size=n)
        if self._synced_step is not None:
            self.log("train/weight_sync_s", float(self.weight_sync_seconds), batch_size=n)

    @torch.no_grad()
    def log_z_calibration(self) -> dict[str, float]:
        """The head's log Z_φ(q) of every training prompt against the exact log Z(q):
        ``log_z_phi_mean``, ``log_z_phi_error`` (mean of log Z_φ − log Z), ``log_z_phi_abs_error``
        (mean |log Z_φ − log Z|) and ``log_z_phi_corr`` (Pearson correlation across prompts;
        left out where either side is constant across prompts, as it is undefined there).

        The head and the policy run in eval mode (no dropout, so no random numbers are drawn
        and a resumed run stays exact), on the prompts alone: the policy is causal, so the
        prompt positions' hidden states are those the head pools during training."""
        was_training = self.policy.training, self.log_z_head.training
        self.policy.eval(), self.log_z_head.eval()
        tokens = pack(self.prompt_ids, [[] for _ in self.prompt_ids], self.tok.pad_token_id).to(
            self.device
        )
        decoder, _ = decoder_and_head(self.policy)
        P = tokens.prompt_len
        hidden = decoder(
            input_ids=tokens.input_ids[:, :P],
            attention_mask=tokens.attention_mask[:, :P],
            position_ids=tokens.position_ids[:, :P],
            use_cache=False,
        ).last_hidden_state
        # [n_prompts]
        phi = self.log_z_head(hidden.float(), tokens.attention_mask[:, :P]).double().cpu()
        self.policy.train(was_training[0]), self.log_z_head.train(was_training[1])
        exact = self.log_z_exact.double().cpu()
        error = phi - exact
        out = {
            "log_z_phi_mean": float(phi.mean()),
            "log_z_phi_error": float(error.mean()),
            "log_z_phi_abs_error": float(error.abs().mean()),
        }
        if len(phi) > 1 and float(phi.std()) > 0 and float(exact.std()) > 0:
            out["log_z_phi_corr"] = float(torch.corrcoef(torch.stack([phi, exact]))[0, 1])
        return out

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return with_schedule(self.optimizer_factory(params), self.lr_schedule)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_generated"] = self.tokens_generated
        checkpoint["rollouts_done"] = self.rollouts_done
        checkpoint["groups_dropped"] = self.groups_dropped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_generated = checkpoint.get("tokens_generated", 0)
        # a checkpoint from before rollouts were counted: every rollout took `updates` steps
        self.rollouts_done = checkpoint.get(
            "rollouts_done", int(checkpoint["global_step"]) // self.updates
        )
        self.groups_dropped = checkpoint.get("groups_dropped", 0)


def prompt_loader(
    module: OnlinePolicyModule, n_prompts: int, prompts_per_step: int, seed: int
) -> DataLoader:
    """Batches of training-prompt indices, one per rollout, in an order a resumed run
    continues exactly: rollout r gets batch r of a seeded stream (see
    :class:`disa.training.data.StepBatches`); on resume r is the checkpoint's rollout count."""
    from disa.training.data import StepBatches

    stream = StepBatches(
        n_prompts,
        prompts_per_step,
        seed,
        drop_last=n_prompts >= prompts_per_step,
        start=_RolloutsDone(module),
    )
    return DataLoader(stream, batch_size=None, collate_fn=torch.tensor)


class _RolloutsDone:
    """Rollouts the module has sampled (0 before fit, the checkpoint's count after a resume);
    a class rather than a closure so that the loader pickles (``trainer.strategy=ddp_spawn``
    sends it to other processes)."""

    def __init__(self, module: OnlinePolicyModule):
        self.module = module

    def __call__(self) -> int:
        return int(self.module.rollouts_done) if self.module._trainer is not None else 0
