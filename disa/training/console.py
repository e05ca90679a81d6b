"""What training prints: each of Lightning's log lines once, no advertisements, and a progress
bar of optimizer steps out of ``trainer.max_steps``."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

#: Lightning's loggers that may carry console handlers of their own
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def _is_advert(record: logging.LogRecord) -> bool:
    """Lightning's "💡 Tip: …" lines advertising its cloud services (litlogger, litmodels)."""
    return record.getMessage().lstrip("💡 ").startswith("Tip:")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_advert(record)


def route_lightning_logs() -> None:
    """Print each of Lightning's log lines once, without its advertisements and without two
    warnings no user of the harness can act on.

    The ``lightning`` package logger has a console handler of its own and also passes its
    records on to the root logger, to which Hydra gives a console handler and the run's log
    file: every INFO line came out twice. Where the root logger has handlers, Lightning's own
    are removed, so each line is printed once, in the format of the rest of the run, and is
    also written to the log file. Without root handlers (a notebook) Lightning's stay.
    """
    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            lg = logging.getLogger(name)
            for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                lg.removeHandler(h)
            lg.propagate = True
    # the logger of Lightning's rank_zero_info, which prints the tips
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())
    # The online module steps its optimizer itself, after which a checkpoint holds the updated
    # weights with the updated step count: what a resume needs, not the problem Lightning warns of.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # Lightning 2.6 still builds torch's deprecated LeafSpec on every batch; the warning is for
    # Lightning's authors, nothing a user of the harness can act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of ``trainer.max_steps`` ("train
    120/300"). Lightning's own counts the batches of an epoch and titles them with
    ``max_epochs - 1``, which reads "Epoch 0/-2" when training is bounded by ``max_steps``
    (``max_epochs: -1``). A resumed run's bar starts at the step it resumes from; the bar is
    closed at the last step, so that Lightning's "`Trainer.fit` stopped" starts a line of its
    own; the logger's version number is left out of the bar."""

    @property
    def train_description(self) -> str:
        return "train"

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:  # bounded by epochs: Lightning's batch count is the right one
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar  # made at on_train_start, before the first step
        bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step
        bar.refresh()
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or n == bar.n:  # micro-batches of one step
            return None
        last = n >= bar.total
        if n % self.refresh_rate == 0 or last:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=not last)
        if last:
            bar.close()  # draws the last state and disables the bar: later updates print nothing
        return None

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
