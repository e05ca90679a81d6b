"""Checkpoints that are whole and finite, or absent.

Lightning's default checkpoint writer streams the file to its final name, so a kill or a
full disk mid-write leaves a truncated ``last.ckpt`` that every later resume trips over,
and it writes whatever the weights hold, NaN included. :class:`AtomicCheckpointIO` writes
to a temporary file in the destination directory, fsyncs it and renames it into place (a
rename within one directory is atomic on POSIX, whatever filesystem the cache is on), and
refuses to write a checkpoint with a non-finite tensor. :func:`verify_checkpoint` is run
before resuming from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from disa.cache import atomic_write


class PoisonedCheckpointError(RuntimeError):
    """A checkpoint is unreadable or holds non-finite values; it is never resumed from."""


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating-point tensors in ``obj`` (nested dicts and lists)
    that hold a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return [prefix or "<tensor>"]
        return []
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else ()
    )
    return [
        p for k, v in items for p in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint via a temp file beside it and ``os.replace``; refuse non-finite ones."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise PoisonedCheckpointError(
                f"refusing to write checkpoint {path}: non-finite values in {bad[:5]} "
                f"({len(bad)} tensor(s)); training diverged (lower the learning rate or β, or check the rewards)"
            )
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`PoisonedCheckpointError`, naming ``path``, when it cannot be read whole
    or its weights are not all finite."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated zip, a wrong format: all mean "not a checkpoint"
        raise PoisonedCheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); it was not resumed from. "
            "Delete it to restart this training from step 0."
        ) from e
    bad = non_finite_tensors(state.get("state_dict", {}) if isinstance(state, dict) else state)
    if bad:
        raise PoisonedCheckpointError(
            f"checkpoint {path} holds non-finite weights in {bad[:5]} ({len(bad)} tensor(s)); it was not resumed "
            "from. Delete it to restart this training from step 0."
        )


class FiniteGuard(Callback):
    """Before every optimizer step, stop the run when a gradient is non-finite (a NaN
    reward, an overflowing loss): the update never reaches the weights, and the last
    checkpoint stays the last finite one."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        # one device sync per step, not one per parameter; names only when something is wrong
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            bad = non_finite_tensors(grads)
            raise PoisonedCheckpointError(
                f"non-finite gradient at optimizer step {trainer.global_step} in {bad[:5]} ({len(bad)} "
                "parameter(s)); the step was not taken. Check the rewards and the loss (train/* metrics), "
                "or lower β or the learning rate"
            )
