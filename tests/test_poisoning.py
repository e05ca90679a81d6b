"""Nothing poisoned: a checkpoint is whole and finite or not written, a NaN gradient stops
the run before the optimizer step, a poisoned checkpoint is refused by name on resume,
and SIGTERM/SIGINT end a job with a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from fs_support import tmpfs

from disa.training.checkpoints import (
    AtomicCheckpointIO,
    FiniteGuard,
    PoisonedCheckpointError,
    non_finite_tensors,
    verify_checkpoint,
)


def _ckpt(value: float) -> dict:
    return {
        "state_dict": {"policy.w": torch.full((3,), value), "policy.step": torch.tensor(2)},
        "global_step": 2,
    }


def test_non_finite_tensors_are_found_by_path():
    state = {
        "a": torch.ones(2),
        "b": [torch.tensor([1.0, float("inf")])],
        "c": {"d": torch.tensor([float("nan")])},
        "n": torch.tensor([3]),
    }
    assert sorted(non_finite_tensors(state)) == ["b.0", "c.d"]
    assert non_finite_tensors({"a": torch.ones(2)}) == []


def test_atomic_checkpoint_refuses_nan_and_keeps_the_last_finite_one(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    before = path.read_bytes()
    with pytest.raises(PoisonedCheckpointError, match=r"last\.ckpt.*policy\.w"):
        io.save_checkpoint(_ckpt(float("nan")), path)
    assert path.read_bytes() == before
    verify_checkpoint(path)
    assert list(tmp_path.iterdir()) == [path]


def test_a_write_that_fails_midway_leaves_the_old_checkpoint_and_no_temp_file(
    tmp_path, monkeypatch
):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(_ckpt(2.0), path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_poisoned_checkpoint_is_refused_by_name(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    if damage == "truncated":
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "unreadable"
    else:
        torch.save(_ckpt(float("nan")), path)  # written by something other than the harness
        match = "non-finite weights"
    with pytest.raises(PoisonedCheckpointError, match=match) as e:
        verify_checkpoint(path)
    assert str(path) in str(e.value)


class _Toy(L.LightningModule):
    def __init__(self, poison_at: int):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.poison_at = poison_at

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch[0]).pow(2).mean()
        return loss * float("nan") if batch_idx == self.poison_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)


def test_a_nan_loss_stops_training_before_the_step_and_no_checkpoint_holds_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _Toy(poison_at=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[ckpt, FiniteGuard()],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(PoisonedCheckpointError, match="non-finite gradient at optimizer step 2"):
        trainer.fit(model, _loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    verify_checkpoint(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


_SIGNALLED = textwrap.dedent("""
    import os, signal, sys
    import lightning as L, torch
    sys.path.insert(0, {tests!r})
    from test_poisoning import _Toy, _loader
    from disa.job import _raise_on_signals

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.{sig})

    _raise_on_signals()
    L.Trainer(max_steps=4, callbacks=[Kill()], logger=False, enable_progress_bar=False,
              enable_checkpointing=False).fit(_Toy(poison_at=-1), _loader())
    print("FIT RETURNED")
""")


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_training_exits_non_zero(sig, code):
    script = _SIGNALLED.format(tests=str(Path(__file__).parent), sig=sig)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "FIT RETURNED" not in proc.stdout


# -- two filesystems ---------------------------------------------------------------------------
_SLOW_WRITER = """
import io, sys, time, torch
from disa.training.checkpoints import AtomicCheckpointIO
real_save = torch.save

def slow_save(obj, f):
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    for i in range(0, len(data), 1 << 20):
        f.write(data[i:i + (1 << 20)])
        f.flush()
        print("writing", flush=True)
        time.sleep(0.2)

torch.save = slow_save
big = {"state_dict": {"policy.w": torch.full((4_000_000,), 2.0)}, "global_step": 4}
AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])
"""


def test_checkpoint_on_another_filesystem_survives_a_kill_mid_write(tmp_path):
    """The checkpoint directory on a tmpfs, the temp dir on the disk: a writer killed in
    the middle of a 16 MB checkpoint leaves the previous ``last.ckpt`` whole under its name;
    its temp file is removed when the artifact is built again."""
    from disa.cache import Cache

    with tmpfs(tmp_path / "cache", "64m") as root:
        art = Cache(root).artifact("train", {"test": 1})
        path = art.path / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), path)
        writer = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        assert writer.stdout.readline().strip() == "writing"
        writer.kill()
        writer.wait()
        verify_checkpoint(path)
        assert float(torch.load(path, weights_only=False)["state_dict"]["policy.w"][0]) == 1.0
        leftovers = list(path.parent.glob(".last.ckpt.*.tmp"))
        assert leftovers, "the killed writer's temp file should be beside the checkpoint"
        assert art.remove_stale_temp_files() == leftovers and not list(path.parent.glob("*.tmp"))


def test_full_filesystem_keeps_the_last_checkpoint(tmp_path):

    with tmpfs(tmp_path / "cache", "1m") as root:
        io, path = AtomicCheckpointIO(), root / "last.ckpt"
        io.save_checkpoint(_ckpt(1.0), path)
        before = path.read_bytes()
        big = {"state_dict": {"policy.w": torch.full((1_000_000,), 2.0)}, "global_step": 4}
        with pytest.raises(OSError, match=r"last\.ckpt.*No space left"):
            io.save_checkpoint(big, path)
        assert path.read_bytes() == before and list(root.iterdir()) == [path]
