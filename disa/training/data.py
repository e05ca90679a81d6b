"""Cached trajectories as a Lightning DataModule.

Each item is one trajectory with its prompt/completion token ids and the per-trajectory
tensors of the loss batch schema (:data:`disa.losses.BATCH_FIELDS`) that the cache holds:
``reward`` and ``logp_ref_seq`` from the scores, ``log_z_hat`` from the frozen anchor
(:data:`CACHE_FIELDS`). Batches are packed by :func:`disa.scoring.pack`.

The order of the batches is a pure function of the seed: batch number ``b`` of a run is
slice ``b mod P`` of the permutation of pass ``b // P`` (``P`` batches per pass over the
data, each pass reshuffled with its own seed). A run resumed from a checkpoint therefore
continues with exactly the batch the killed run would have trained on next, instead of
restarting the epoch's shuffle as a plain shuffled ``DataLoader`` would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from disa.scoring import pack
from disa.settings import derive_seed

#: batch field (disa.losses.BATCH_FIELDS) → the column of the training frame it is read from:
#: what a loss trained from the cache can have. Others (old-policy log-probs, groups) exist
#: only for a rollout of the current policy.
CACHE_FIELDS = {"reward": "reward", "logp_ref_seq": "logp_ref", "log_z_hat": "log_z_hat"}


class TrajectoryDataset(Dataset):
    def __init__(self, frame: pd.DataFrame):
        self.prompt_ids = frame.prompt_ids.tolist()
        self.completion_ids = frame.completion_ids.tolist()
        self.values = {field: torch.tensor(frame[c].to_numpy(np.float64), dtype=torch.float32)
                       for field, c in CACHE_FIELDS.items() if c in frame}

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> int:
        return i


class StepBatches(IterableDataset):
    """An endless stream of index batches in which batch ``b`` depends only on ``(seed, b)``.

    Iteration starts at batch ``start()``, read when iteration begins: after a resume that
    is the number of batches the restored checkpoint has trained on. The stream has no
    length, so Lightning never ends an epoch and restarts it (``trainer.max_steps`` ends
    training); each pass over the data still gets a fresh permutation.

    With several processes (DDP) batch ``b`` is drawn for all of them together
    (``batch_size`` items per process, as a ``DistributedSampler`` would give) and each
    takes its share. It is an iterable dataset so that Lightning does not replace it with
    a ``DistributedSampler`` of its own.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool,
                 start: Callable[[], int] = lambda: 0, rank: int | None = None, world_size: int | None = None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one item and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.seed, self.start, self.drop_last = n, int(seed), start, drop_last
        self.batch_size, self._rank, self._world = batch_size, rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def _ranks(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def permutation(self, p: int) -> torch.Tensor:
        """The order of the items in pass ``p`` (seeded by ``seed`` and ``p`` alone)."""
        if self._perm is None or self._perm[0] != p:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "pass", p))
            self._perm = (p, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch(self, b: int) -> list[int]:
        """This process's items of batch ``b``."""
        rank, world = self._ranks()
        size = self.batch_size * world
        per_pass = self.n // size if self.drop_last and self.n >= size else -(-self.n // size)
        p, i = divmod(b, per_pass)
        return self.permutation(p)[i * size:(i + 1) * size][rank::world].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("StepBatches is one ordered stream: use num_workers <= 1")
        b = int(self.start())
        while True:
            yield self.batch(b)
            b += 1


class TrajectoryDataModule(L.LightningDataModule):
    """Shuffled mini-batches of cached trajectories, reshuffled every pass (seeded), in an
    order that a resumed run continues exactly (see :class:`StepBatches`)."""

    def __init__(self, frame: pd.DataFrame, batch_size: int, pad_id: int, seed: int = 0):
        super().__init__()
        if len(frame) == 0:
            raise ValueError("no trajectories to train on")
        self.dataset = TrajectoryDataset(frame)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ds = self.dataset
        b = pack([ds.prompt_ids[i] for i in idx], [ds.completion_ids[i] for i in idx], self.pad_id)
        out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
               "position_ids": b.position_ids, "completion_mask": b.completion_mask}
        out |= {k: v[idx] for k, v in ds.values.items()}
        return out

    def batches_done(self) -> int:
        """Batches already trained on: 0 for a fresh run, the checkpoint's count on resume.

        Lightning restores ``global_step`` (and the module's own counter) from the
        checkpoint before it iterates the dataloader. Every optimizer step consumes exactly
        ``accumulate_grad_batches`` batches because the stream has no epoch ends (where
        Lightning would step on a partial accumulation).
        """
        trainer = self.trainer
        if trainer is None:
            return 0
        from_steps = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
        counted = getattr(trainer.lightning_module, "batches_trained", None)
        if counted is not None and int(counted) != from_steps:
            raise RuntimeError(
                f"cannot resume the data order: the checkpoint's module trained on {counted} batches "
                f"but global_step={trainer.global_step} × accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} = {from_steps}"
            )
        return from_steps

    def train_dataloader(self) -> DataLoader:
        n = len(self.dataset)
        batches = StepBatches(n, self.batch_size, self.seed, drop_last=n >= self.batch_size,
                                   start=self.batches_done)
        # batch_size=None: each item of the stream is already a batch (of indices).
        # Its own generator: iterating the loader must not draw from the global RNG, whose
        # state the module restores on resume (see PolicyModule.on_load_checkpoint).
        return DataLoader(batches, batch_size=None, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.seed))
