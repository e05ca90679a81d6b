"""Cached trajectories as a Lightning DataModule, read from a memory-mapped Arrow store.

Each item is one trajectory with its prompt/completion token ids and the per-trajectory
tensors of the loss batch schema (:data:`disa.losses.BATCH_FIELDS`) that the cache holds:
``reward`` and ``logp_ref_seq`` from the scores, ``log_z_hat`` from the frozen anchor
(:data:`CACHE_FIELDS`). Batches are packed by :func:`disa.scoring.pack`.

The store (:func:`write_store`, :class:`Trajectories`) is two uncompressed Arrow IPC files:
``prompts.arrow`` (each distinct prompt's token ids, once) and ``trajectories.arrow`` (per
trajectory: its prompt's row, the completion's token ids as int32, the reward and
``log π_ref``). Every process memory-maps them, so the tokens cost no process memory of
their own (about 4 bytes per token of page cache, shared by all the ranks of a node) and
a pickled dataset (``ddp_spawn``) carries only its path.

The order of the batches is a pure function of the seed: batch number ``b`` of a run is
slice ``b mod P`` of the permutation of pass ``b // P`` (``P`` batches per pass over the
data, each pass reshuffled with its own seed). A run resumed from a checkpoint therefore
continues with exactly the batch the killed run would have trained on next, instead of
restarting the epoch's shuffle as a plain shuffled ``DataLoader`` would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from disa.cache import atomic_writer
from disa.scoring import pack
from disa.settings import derive_seed

#: batch field (disa.losses.BATCH_FIELDS) → the column of the training frame it is read from:
#: what a loss trained from the cache can have. Others (old-policy log-probs, groups) exist
#: only for a rollout of the current policy.
CACHE_FIELDS = {"reward": "reward", "logp_ref_seq": "logp_ref", "log_z_hat": "log_z_hat"}
#: the per-trajectory numbers the store keeps (log Ẑ is per prompt and comes from the anchor)
STORE_VALUES = ("reward", "logp_ref")
#: the layout of the files :func:`write_store` writes (part of the store artifact's key)
STORE_FORMAT = 1
TOKENS = pa.large_list(pa.int32())  # int64 offsets: a store may hold more than 2^31 tokens


def write_store(directory: Path, scores: Path, rows: np.ndarray, batch_rows: int = 4096) -> dict:
    """Write the trajectories at positions ``rows`` (increasing) of the scores table
    ``scores`` (parquet) into an Arrow store in ``directory``, reading ``batch_rows`` of them
    at a time (memory is bounded by a batch, not by the table). Returns its sizes."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0 or np.any(np.diff(rows) <= 0):
        raise ValueError(
            f"rows must be increasing positions of {scores} and not empty, got {len(rows)} rows"
        )
    schema = pa.schema(
        [
            ("prompt", pa.int32()),
            ("completion_ids", TOKENS),
            *((name, pa.float64()) for name in STORE_VALUES),
        ]
    )
    prompt_row: dict[str, int] = {}
    prompt_tokens: list[np.ndarray] = []
    source = pq.ParquetFile(scores)
    tokens = start = 0
    with (
        atomic_writer(directory / "trajectories.arrow") as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        for batch in source.iter_batches(
            batch_size=batch_rows,
            columns=["prompt_id", "prompt_ids", "completion_ids", *STORE_VALUES],
        ):
            take = rows[(rows >= start) & (rows < start + batch.num_rows)] - start
            start += batch.num_rows
            if len(take) == 0:
                continue
            batch = batch.take(pa.array(take))
            index = []
            prompt_ids = batch.column("prompt_ids").to_numpy(zero_copy_only=False)
            for pid, ids in zip(batch.column("prompt_id").to_pylist(), prompt_ids):
                ids = np.asarray(ids, dtype=np.int64)
                row = prompt_row.setdefault(pid, len(prompt_tokens))
                if row == len(prompt_tokens):
                    prompt_tokens.append(ids)
                elif not np.array_equal(prompt_tokens[row], ids):
                    raise ValueError(f"{scores}: prompt {pid!r} has two different token sequences")
                index.append(row)
            # a value past int32 is an error
            completions = pc.cast(batch.column("completion_ids"), TOKENS)
            tokens += int(pc.sum(pc.list_value_length(completions)).as_py() or 0)
            values = [pc.cast(batch.column(name), pa.float64()) for name in STORE_VALUES]
            writer.write_batch(
                pa.record_batch([pa.array(index, pa.int32()), completions, *values], schema=schema)
            )
    if start < rows[-1] + 1:
        raise ValueError(f"{scores} has {start} rows; position {rows[-1]} was asked for")
    prompts = pa.table(
        {
            "prompt_id": pa.array(list(prompt_row), pa.string()),
            "prompt_ids": pa.array([p.astype(np.int32) for p in prompt_tokens], TOKENS),
        }
    )
    with (
        atomic_writer(directory / "prompts.arrow") as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, prompts.schema) as writer,
    ):
        writer.write_table(prompts)
    return {
        "trajectories": len(rows),
        "prompts": len(prompt_tokens),
        "completion_tokens": tokens,
        "prompt_tokens": int(sum(len(p) for p in prompt_tokens)),
    }


class _Lists:
    """Random access to the rows of a (chunked) list column without copying its values."""

    def __init__(self, column: pa.ChunkedArray):
        self.chunks = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in column.chunks]
        self.starts = np.cumsum([0, *(len(c) for c in column.chunks)])

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        offsets, values = self.chunks[j]
        k = i - self.starts[j]
        return values[offsets[k] : offsets[k + 1]]


class Trajectories(Dataset):
    """The trajectories a loss trains on: token ids (read in place from Arrow memory) and
    the per-trajectory values of :data:`CACHE_FIELDS`.

    :meth:`open` memory-maps a store written by :func:`write_store`; :meth:`from_frame`
    builds the same thing in memory from a frame (tests, scripts).
    """

    def __init__(
        self,
        prompts: pa.Table,
        trajectories: pa.Table,
        log_z_hat: np.ndarray | None = None,
        path: Path | None = None,
        anchor: pd.Series | None = None,
    ):
        self.path, self._anchor = path, anchor
        self._prompts = _Lists(prompts.column("prompt_ids"))
        self._completions = _Lists(trajectories.column("completion_ids"))
        self.prompt_of = trajectories.column("prompt").to_numpy()
        self.values = {
            field: trajectories.column(c).to_numpy()
            for field, c in CACHE_FIELDS.items()
            if c in trajectories.column_names
        }
        if log_z_hat is not None:
            self.values["log_z_hat"] = np.asarray(log_z_hat, dtype=np.float64)
        self._keep = (prompts, trajectories)  # the buffers the views above point into

    @classmethod
    def open(cls, path: str | Path, log_z_hat: pd.Series | None = None) -> Trajectories:
        """The store in ``path``, memory-mapped; ``log_z_hat`` (indexed by prompt id) gives
        each trajectory its prompt's frozen log Ẑ."""
        path = Path(path)
        prompts, trajectories = (
            pa.ipc.open_file(pa.memory_map(str(path / f"{name}.arrow"), "r")).read_all()
            for name in ("prompts", "trajectories")
        )
        per_traj = None
        if log_z_hat is not None:
            ids = prompts.column("prompt_id").to_pandas()
            per_prompt = log_z_hat.reindex(ids.to_numpy()).to_numpy(np.float64)
            if np.isnan(per_prompt).any():
                missing = ids[np.isnan(per_prompt)].tolist()[:5]
                raise ValueError(
                    f"the anchor has no log_z_hat for prompt(s) {missing} of the store {path}"
                )
            per_traj = per_prompt[trajectories.column("prompt").to_numpy()]
        return cls(prompts, trajectories, per_traj, path=path, anchor=log_z_hat)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Trajectories:
        """In memory, one prompt row per trajectory: ``prompt_ids``, ``completion_ids`` and
        any of the columns of :data:`CACHE_FIELDS`."""
        n = len(frame)
        prompts = pa.table(
            {"prompt_ids": pa.array([np.asarray(p, np.int32) for p in frame.prompt_ids], TOKENS)}
        )
        columns = {
            "prompt": pa.array(np.arange(n, dtype=np.int32)),
            "completion_ids": pa.array(
                [np.asarray(c, np.int32) for c in frame.completion_ids], TOKENS
            ),
        }
        columns |= {
            c: pa.array(frame[c].to_numpy(np.float64)) for c in CACHE_FIELDS.values() if c in frame
        }
        return cls(prompts, pa.table(columns))

    def __reduce__(self):
        if self.path is not None:  # a process it is sent to maps the same files
            return (Trajectories.open, (self.path, self._anchor))
        return super().__reduce__()

    def __len__(self) -> int:
        return len(self.prompt_of)

    def __getitem__(self, i: int) -> int:
        return i

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Trajectory ``i``'s prompt and completion token ids (views into the store)."""
        return self._prompts[int(self.prompt_of[i])], self._completions[i]

    def batch_values(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The float32 tensors of :data:`CACHE_FIELDS` for the trajectories ``idx``."""
        return {
            field: torch.from_numpy(v[idx]).to(torch.float32) for field, v in self.values.items()
        }


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

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        start: Callable[[], int] = lambda: 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if n < 1 or batch_size < 1:
            raise ValueError(
                f"need at least one item and batch_size >= 1, got n={n}, batch_size={batch_size}"
            )
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
        return self.permutation(p)[i * size : (i + 1) * size][rank::world].tolist()

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

    def __init__(
        self, data: Trajectories | pd.DataFrame, batch_size: int, pad_id: int, seed: int = 0
    ):
        super().__init__()
        if len(data) == 0:
            raise ValueError("no trajectories to train on")
        self.dataset = Trajectories.from_frame(data) if isinstance(data, pd.DataFrame) else data
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        prompts, completions = zip(*(self.dataset.tokens(i) for i in idx))
        b = pack(prompts, completions, self.pad_id)
        out = {
            "input_ids": b.input_ids,
            "attention_mask": b.attention_mask,
            "position_ids": b.position_ids,
            "completion_mask": b.completion_mask,
        }
        return out | self.dataset.batch_values(idx)

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
        batches = StepBatches(
            n, self.batch_size, self.seed, drop_last=n >= self.batch_size, start=self.batches_done
        )
        # batch_size=None: each item of the stream is already a batch (of indices).
        # Its own generator: iterating the loader must not draw from the global RNG, whose
        # state the module restores on resume (see PolicyModule.on_load_checkpoint).
        return DataLoader(
            batches,
            batch_size=None,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
