"""What a run prints: each log line once, no advertisements, a progress bar of optimizer steps out
of max_steps, the final summary table (disa/training/console.py, disa/job.py, disa/tracking.py)."""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter

import lightning as L
import pytest
import torch
from conftest import run_cli

from disa.training.console import StepProgressBar, route_lightning_logs


@pytest.fixture
def root_handler():
    """A root console handler, as Hydra installs one, writing to a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_lightning_lines_print_once_without_adverts(root_handler, capfd):
    route_lightning_logs()
    L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
    )
    lines = root_handler.getvalue().splitlines()
    assert sum("GPU available" in line for line in lines) == 1, lines
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err  # Lightning's own console handler is gone
    assert not any("Tip:" in line for line in lines + (out + err).splitlines())


class _Steps(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).sum() ** 2
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.ones(64, 2)), batch_size=4
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_progress_bar_counts_optimizer_steps_out_of_max_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        max_epochs=-1,
        accumulate_grad_batches=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[StepProgressBar()],
        enable_model_summary=False,
    )
    trainer.fit(_Steps())
    frames = capsys.readouterr().out.replace("\r", "\n").splitlines()
    bars = [f for f in frames if f.startswith("train:")]
    assert bars and "3/3" in bars[-1] and "train/loss=" in bars[-1]
    assert not any(
        "/6" in f or "/16" in f for f in bars
    )  # never batches (6 for 3 steps of 2, 16 per epoch)
    assert not any("Epoch" in f or "v_num" in f for f in frames)


def test_wandb_logger_is_built_without_the_deprecated_anonymous_setting(
    tmp_path, monkeypatch, capfd
):
    from omegaconf import OmegaConf

    from disa import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create(
        {
            "stage": "all",
            "logger": {
                "wandb": {
                    "_target_": "lightning.pytorch.loggers.WandbLogger",
                    "project": "t",
                    "mode": "offline",
                }
            },
        }
    )
    (lg,) = tracking.build_loggers(cfg, tmp_path)
    try:
        assert "anonymous" not in lg._wandb_init
        assert "anonymous" not in "".join(capfd.readouterr())
    finally:
        tracking.finish([lg])


def test_a_run_prints_each_line_once_with_a_step_bar_and_the_summary_table(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    env.pop("TQDM_DISABLE", None)
    proc = run_cli(
        "debug=fast",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=true",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    # progress bars redraw themselves with "\r" in a terminal and a line per frame elsewhere:
    # frames are not log lines (two bars of one kind, e.g. per model, may draw the same frame)
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in out.split("\n")]
    frames = [ln for ln in lines if re.search(r"\d+/[\d?]+ \[", ln)]
    repeated = {
        ln: n for ln, n in Counter(ln for ln in lines if ln and ln not in frames).items() if n > 1
    }
    assert not repeated, repeated
    train = [f for f in frames if f.startswith("train:")]
    assert len(train) == len(set(train)), train
    assert "Tip:" not in out and "LeafSpec" not in out and "Loading weights" not in out
    assert sum("`Trainer.fit` stopped" in ln for ln in lines) == 1
    assert "Epoch 0/-2" not in out and "train: 100%" in out and "5/5" in out
    assert "┃ metric" in out and "│ mean_at_k" in out  # the final summary table
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("`Trainer.fit` stopped") == 1  # Lightning's lines reach the run's log file
