"""The LightningModule: a policy, a loss from the registry, an optimizer.

The module holds only the policy. For DISA that is everything a step needs: the reference
log-probs and the anchor come with the batch from the cache, so there is no reference
forward and no generation inside a training step.

Resuming is exact: the checkpoint also holds the number of batches trained on (from which
:class:`disa.training.data.TrajectoryDataModule` continues the data order) and the RNG
states (for models with dropout), so a killed and resumed run ends where an uninterrupted
one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from disa.losses import LossSpec
from disa.scoring import Batch, token_logprobs
from disa.training.schedule import current_lr


class PolicyModule(L.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        loss: LossSpec,
        options: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        chunk_size: int = 2048,
        logprob_impl: str = "chunked",
        lr_schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
        | None = None,
    ):
        """``loss`` and its ``options`` from the registry (:mod:`disa.losses`); the batches
        (from :class:`disa.training.data.TrajectoryDataModule`) hold the fields it needs.
        ``chunk_size`` and ``logprob_impl`` go to :func:`disa.scoring.token_logprobs`.
        ``lr_schedule`` builds the learning-rate scheduler of the optimizer, stepped after
        every optimizer step (:func:`disa.training.schedule.lr_scheduler`); None: constant."""
        super().__init__()
        self.policy = policy
        self.loss, self.options = loss, options
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.chunk_size, self.logprob_impl = chunk_size, logprob_impl
        #: batches trained on so far; saved in checkpoints, read by the data module on resume
        self.batches_trained = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = Batch(
            batch["input_ids"],
            batch["attention_mask"],
            batch["position_ids"],
            batch["completion_mask"],
        )
        logp = self.logprobs(tokens)  # [B, T]
        loss, metrics = self.loss(logp, tokens.completion_mask, batch, self.options)
        self.log_dict(
            {f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"},
            prog_bar=False,
            batch_size=tokens.input_ids.shape[0],
        )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=tokens.input_ids.shape[0])
        self.log("train/lr", current_lr(self.optimizers()), batch_size=tokens.input_ids.shape[0])
        self.batches_trained += 1
        return loss

    def logprobs(self, tokens: Batch) -> torch.Tensor:
        """The policy's per-token log-probs ``[B, T]`` of the completion tokens (with grad).
        :class:`disa.training.sharded.ShardedPolicyModule` computes them through its FSDP2 root."""
        return token_logprobs(
            self.policy, tokens, chunk_size=self.chunk_size, impl=self.logprob_impl
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["disa"] = {"batches_trained": self.batches_trained, "rng": _rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("disa")
        if state is None:  # a checkpoint from before this was recorded: optimizer steps tell
            self.batches_trained = int(checkpoint["global_step"]) * int(
                self.trainer.accumulate_grad_batches
            )
            return
        self.batches_trained = int(state["batches_trained"])
        _set_rng_state(state["rng"])

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return with_schedule(self.optimizer_factory(params), self.lr_schedule)


def with_schedule(optimizer: torch.optim.Optimizer, lr_schedule: Callable | None):
    """What ``configure_optimizers`` returns: the optimizer, with its scheduler stepped once per
    optimizer step where there is one."""
    if lr_schedule is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": lr_schedule(optimizer), "interval": "step"},
    }


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
