"""Past one machine: many workers fill one artifact (per-shard claims) on an existing engine
(Ray tasks, SLURM job arrays through submitit), and training reads a memory-mapped store.

- the claim protocol itself, with forked processes: each shard written once, a worker
  killed mid-shard loses that shard only and another redoes it (default suite, seconds);
- 2 Ray workers and 2 submitit-local array tasks fill the rollout and score artifacts of a
  real pipeline byte-identical to one process, and take over the shard of a worker killed
  mid-shard;
- the memory-mapped trajectory store gives exactly the batches of the in-memory frame the
  train stage read before it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shard_workers
import torch
from conftest import run_cli

from disa.cache import Cache, CacheError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: the debug pipeline with one prompt per sampling shard: 9 shards per mixture component
BASE = ("debug=fast", "sampler.prompts_per_shard=1")
HAS_RAY = __import__("importlib.util").util.find_spec("ray") is not None
HAS_SUBMITIT = __import__("importlib.util").util.find_spec("submitit") is not None


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[*BASE, *overrides])


def context(cache: Path, executor=None, *overrides: str):
    """The stage context of a ``run.py *BASE *overrides`` job on ``cache`` (in this process)."""
    from disa import stages
    from disa.models import resolve_backbone
    from disa.settings import Settings
    from disa.tasks import build_task

    cfg = compose(f"cache_dir={cache}", *overrides)
    task = build_task(cfg)
    c = Cache(cache)
    ctx = stages.Context(
        Settings.from_config(cfg),
        cfg,
        c,
        task,
        resolve_backbone(cfg, task, c),
        cache.parent / "run",
        torch.device("cpu"),
    )
    if executor is not None:
        ctx.executor = executor
    return ctx


def checksums(art_dir: Path) -> dict[str, str]:
    """The manifest's SHA-256 of every file of a finished artifact."""
    return {
        rel: e["sha256"]
        for rel, e in json.loads((art_dir / "manifest.json").read_text())["files"].items()
    }


@pytest.fixture(autouse=True)
def _one_thread():
    # one thread, as the workers (cpus_per_worker=1) and the seed run (OMP_NUM_THREADS=1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _workers_import_shard_workers(monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """One process through every stage (the reference rollouts, scores and anchor)."""
    tmp = tmp_path_factory.mktemp("seed")
    proc = run_cli(
        *BASE,
        "trainer.max_steps=2",
        "logger=none",
        f"cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={tmp / 'run'}",
        cwd=tmp,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def fresh_cache(seed: Path, dst: Path) -> Path:
    """A cache holding only the seed's pre-trained backbone."""
    shutil.copytree(seed / "cache" / "backbone", dst / "backbone")
    return dst


# == the claim protocol, with plain processes ==================================================
def _fill_in_process(root: str, spec: dict, hang_on, marker, barrier) -> None:
    if barrier is not None:
        barrier.wait()
    shard_workers.toy_fill(root, spec, hang_on, marker, 0)


def _reference(tmp_path: Path) -> pd.DataFrame:
    return pd.concat(
        [shard_workers.toy_shard(i) for i in range(shard_workers.N_SHARDS)], ignore_index=True
    )


def _sealed(root: Path, spec: dict):
    """The toy artifact, sealed the way a stage seals (every shard present), and its rows."""
    art = Cache(root).artifact("toy", spec)
    assert art.missing_shards(shard_workers.units()) == []
    art.finalize()
    return art, art.read_shards()


def test_three_processes_write_each_shard_once(tmp_path):
    ctx = mp.get_context("fork")
    spec = {"toy": 1}
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=_fill_in_process, args=(str(tmp_path), spec, None, None, barrier))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    art, rows = _sealed(tmp_path, spec)
    journal = art.shard_journal()
    # every shard written exactly once, the work shared by more than one process
    assert sorted(e["shard"] for e in journal) == [
        f"part-{i:05d}" for i in range(shard_workers.N_SHARDS)
    ]
    assert len({e["pid"] for e in journal}) >= 2 and {e["pid"] for e in journal} <= {
        p.pid for p in procs
    }
    pd.testing.assert_frame_equal(rows, _reference(tmp_path))


def _wait_for(path: Path, proc_alive, what: str, timeout: float = 120) -> int:
    t0 = time.monotonic()
    while not path.exists() or not path.read_text():
        assert proc_alive(), f"the worker ended before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting until {what}"
        time.sleep(0.02)
    return int(path.read_text())


def test_process_killed_mid_shard_loses_that_shard_only(tmp_path):
    """A worker SIGKILLed while it holds a shard's claim: the claim is released with it, the
    shards it wrote are kept as they are, and a second worker writes the rest."""
    spec, marker = {"toy": 2}, tmp_path / "hung"
    proc = mp.get_context("fork").Process(
        target=_fill_in_process, args=(str(tmp_path), spec, 3, str(marker), None)
    )
    proc.start()
    pid = _wait_for(marker, proc.is_alive, "the worker claimed shard 3")
    art = Cache(tmp_path).artifact("toy", spec)
    with art.claim(3) as free:
        assert not free  # held by the hung worker
    written = {p: p.stat().st_ino for p in (art.path / "shards").glob("part-*.parquet")}
    assert len(written) == 3  # shards 0-2, before it hung on 3
    os.kill(pid, signal.SIGKILL)
    proc.join(timeout=30)

    shard_workers.toy_fill(str(tmp_path), spec, None, None, 1)
    art, rows = _sealed(tmp_path, spec)
    assert {p: p.stat().st_ino for p in written} == written  # not rewritten
    by = {e["shard"]: e["pid"] for e in art.shard_journal()}
    assert (
        by["part-00003"] == os.getpid() != pid
        and [by[f"part-{i:05d}"] for i in range(3)] == [pid] * 3
    )
    pd.testing.assert_frame_equal(rows, _reference(tmp_path))


def test_stale_temp_file_of_a_claimed_shard_is_kept(tmp_path):
    """The artifact lock holder removes temp files of dead writers, but not the one of a shard
    a live worker holds (it is being written)."""
    art = Cache(tmp_path).artifact("toy", {"toy": 3})
    shards = art.path / "shards"
    shards.mkdir(parents=True)
    live, dead, own = (
        shards / ".part-00001.parquet.abc.tmp",
        shards / ".part-00002.parquet.def.tmp",
        art.path / ".scores.parquet.ghi.tmp",
    )
    for p in (live, dead, own):
        p.write_bytes(b"partial")
    with art.claim(1) as mine:
        assert mine
        removed = art.remove_stale_temp_files()
    assert sorted(removed) == sorted([dead, own]) and live.exists() and not dead.exists()


def test_missing_shards_after_failed_workers_are_named(tmp_path):
    """Workers that failed and left shards unwritten: nothing is sealed, the error names the
    shards and the workers' errors."""
    from disa.stages.context import Context

    class AllFail:
        name, workers, cpus_per_worker = "fake", 2, 1

        def run(self, fn, args):
            return [RuntimeError("out of GPU memory"), RuntimeError("node failure")]

    art = Cache(tmp_path).artifact("toy", {"toy": 4})
    art.write_shard(0, shard_workers.toy_shard(0))
    ctx = Context(*(None,) * 8, executor=AllFail())
    with pytest.raises(CacheError) as err:
        ctx.fill(art, shard_workers.toy_fill, shard_workers.units())
    msg = str(err.value)
    assert (
        "5 shard(s) missing" in msg and "part-00001.parquet" in msg and "out of GPU memory" in msg
    )
    assert not art.is_complete()


# == executors on the real pipeline ===========================================================
def _executor(kind: str, tmp_path: Path):
    from disa.executors import RayExecutor, SlurmExecutor

    if kind == "ray":
        return RayExecutor(workers=2, cpus_per_worker=1)
    return SlurmExecutor(
        workers=2,
        folder=str(tmp_path / "submitit" / "%j"),
        cluster="local",
        parameters={"timeout_min": 10},
    )


NEEDS_RAY = pytest.mark.skipif(not HAS_RAY, reason="needs the 'ray' extra")
NEEDS_SUBMITIT = pytest.mark.skipif(not HAS_SUBMITIT, reason="needs the 'sweeps' extra")
EXECUTORS = [pytest.param("ray", marks=NEEDS_RAY), pytest.param("slurm", marks=NEEDS_SUBMITIT)]


@pytest.mark.parametrize(
    # submitit's local array tasks: about 70 s (three rounds of process starts and polling)
    "kind",
    [
        pytest.param("ray", marks=NEEDS_RAY),
        pytest.param("slurm", marks=[NEEDS_SUBMITIT, pytest.mark.slow]),
    ],
)
def test_two_workers_fill_rollouts_and_scores_byte_identical_to_one_process(seed, tmp_path, kind):
    """executor=ray (2 Ray tasks) and executor=slurm (2 submitit array tasks, run locally):
    every shard of both rollout artifacts and the score table are the bytes one process
    wrote, and both workers took part."""
    from disa.stages import sample, score

    cache = fresh_cache(seed, tmp_path / "cache")
    executor = _executor(kind, tmp_path)
    try:
        ctx = context(cache, executor)
        rollouts = sample.run(ctx)
        scores = score.run(ctx, rollouts)
    finally:
        executor.close()
    for comp, art in rollouts.items():
        assert checksums(art.path) == checksums(seed / "cache" / "sample" / art.key), comp
        # written by the workers, not by this job (how the shards split between the two
        # depends on which one started first; the toy tests below pin the sharing)
        writers = {e["pid"] for e in art.shard_journal()}
        assert 1 <= len(writers) <= 2 and os.getpid() not in writers, (comp, writers)
    assert checksums(scores.path) == checksums(seed / "cache" / "score" / scores.key)
    assert os.getpid() not in {e["pid"] for e in scores.shard_journal()}


@pytest.mark.parametrize("kind", EXECUTORS)
def test_worker_killed_mid_shard_is_taken_over(tmp_path, kind):
    """One of 2 workers is SIGKILLed while it holds a shard: the other (or, on Ray, the task
    re-run) writes it, and the artifact holds exactly the shards of one process."""
    spec, marker = {"toy": kind}, tmp_path / "hung"
    executor = _executor(kind, tmp_path)
    result: dict = {}

    def drive():
        result["outcomes"] = executor.run(
            shard_workers.toy_fill, (str(tmp_path / "cache"), spec, 2, str(marker))
        )

    thread = threading.Thread(target=drive)
    try:
        thread.start()
        pid = _wait_for(marker, thread.is_alive, "a worker claimed shard 2", timeout=300)
        art = Cache(tmp_path / "cache").artifact("toy", spec)
        with art.claim(2) as free:
            assert not free
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    finally:
        executor.close()
    art, rows = _sealed(tmp_path / "cache", spec)
    by = {e["shard"]: e["pid"] for e in art.shard_journal()}
    # each written once
    assert sorted(by) == [f"part-{i:05d}" for i in range(shard_workers.N_SHARDS)]
    assert by["part-00002"] != pid
    pd.testing.assert_frame_equal(rows, _reference(tmp_path))
    if kind == "slurm":  # the killed array task is reported as failed, the other finished
        assert sum(isinstance(o, Exception) for o in result["outcomes"]) == 1


def test_executor_settings_are_validated():
    from disa.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose("executor=ray", "executor.workers=0", "executor.gpus_per_worker=-1"))
    assert "executor.workers=0 is invalid" in str(err.value)
    assert "executor.gpus_per_worker=-1 is invalid" in str(err.value)
    with pytest.raises(
        ConfigError,
        match=r"executor.cluster='pbs' is invalid; allowed: one of \['slurm', 'local'\]",
    ):
        validate(compose("executor=slurm", "executor.cluster=pbs"))
    validate(compose("executor=slurm"))


# == the memory-mapped store ==================================================================
def todays_frame(ctx, scores, anchor) -> pd.DataFrame:
    """What the train stage trained on before the store: the whole score table in pandas,
    the anchor's K trajectories per prompt, joined with their prompts' log Ẑ."""
    from disa import anchor as anchoring

    s = ctx.settings
    traj, _ = anchoring.select_trajectories(scores.read_table("scores"), s.num_samples, s.strength)
    return traj.merge(
        anchor.read_table("anchor")[["prompt_id", "log_z_hat"]],
        on="prompt_id",
        validate="many_to_one",
    )


def todays_batch(frame: pd.DataFrame, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch the data module made from that frame: packed token lists, float32 values."""
    from disa.scoring import pack

    b = pack([frame.prompt_ids[i] for i in idx], [frame.completion_ids[i] for i in idx], pad_id)
    out = {
        "input_ids": b.input_ids,
        "attention_mask": b.attention_mask,
        "position_ids": b.position_ids,
        "completion_mask": b.completion_mask,
    }
    for field, column in (
        ("reward", "reward"),
        ("logp_ref_seq", "logp_ref"),
        ("log_z_hat", "log_z_hat"),
    ):
        out[field] = torch.tensor(frame[column].to_numpy(np.float64), dtype=torch.float32)[idx]
    return out


def _stage_artifacts(ctx):
    """The scores and anchor artifacts of the seed run (verified and reused)."""
    from disa.stages import anchor, oracle, sample, score

    scores = score.run(ctx, sample.run(ctx))
    return scores, anchor.run(ctx, scores, oracle.run(ctx))


def test_memory_mapped_store_gives_todays_batches(seed, tmp_path):
    """Every batch of 3 passes, in one process and in each of 2 DDP ranks, equals (bit for
    bit) the batch built from the in-memory frame; the tokens are read from a memory map."""
    import pickle

    from disa.stages.train import training_data
    from disa.tokenization import load_tokenizer
    from disa.training.data import StepBatches, TrajectoryDataModule

    cache = tmp_path / "cache"
    shutil.copytree(seed / "cache", cache)
    ctx = context(cache, None, "stage=train")
    scores, anchor = _stage_artifacts(ctx)
    frame = todays_frame(ctx, scores, anchor)
    data = training_data(ctx, scores, anchor)
    assert len(data) == len(frame) == 9 * 8
    # mapped, not read into the process
    assert str(data.path / "trajectories.arrow") in Path("/proc/self/maps").read_text()
    pad = load_tokenizer(ctx.backbone.ref_path).pad_token_id
    module = TrajectoryDataModule(data, 16, pad, seed=5)
    spawned = pickle.loads(pickle.dumps(module.dataset))  # what ddp_spawn sends a rank: the path
    assert spawned.path == data.path and len(pickle.dumps(module.dataset)) < 10_000
    for rank, world in ((None, None), (0, 2), (1, 2)):
        stream = iter(StepBatches(len(data), 16, 5, drop_last=True, rank=rank, world_size=world))
        for _ in range(3 * len(data) // (16 * (world or 1))):
            idx = next(stream)
            want = todays_batch(frame, idx, pad)
            for got in (
                module.collate(idx),
                TrajectoryDataModule(spawned, 16, pad, seed=5).collate(idx),
            ):
                assert got.keys() == want.keys()
                for k in want:
                    assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_store_written_in_small_batches_is_the_same(seed, tmp_path):
    """The store is written a few rows at a time (bounded memory): read back across its
    many record batches, every trajectory's tokens and values equal the one-batch store's."""
    from disa.training.data import Trajectories, write_store

    (path,) = (seed / "cache" / "score").glob("*/scores.parquet")
    rows = np.arange(0, 144, 2)
    one, many = tmp_path / "one", tmp_path / "many"
    a = write_store(one, path, rows)
    b = write_store(many, path, rows, batch_rows=7)
    assert a == b and a["trajectories"] == 72 and a["prompts"] == 9
    x, y = Trajectories.open(one), Trajectories.open(many)
    frame = pd.read_parquet(path).iloc[rows].reset_index(drop=True)
    for i in range(len(rows)):
        for got in (x.tokens(i), y.tokens(i)):
            assert got[0].tolist() == list(frame.prompt_ids[i]) and got[1].tolist() == list(
                frame.completion_ids[i]
            )
    assert np.array_equal(x.values["reward"], frame.reward.to_numpy()) and np.array_equal(
        y.values["logp_ref_seq"], frame.logp_ref.to_numpy()
    )
    with pytest.raises(ValueError, match="increasing"):
        write_store(tmp_path / "bad", path, np.array([3, 1]))


def test_store_refuses_a_prompt_without_an_anchor(seed, tmp_path):
    from disa.training.data import Trajectories, write_store

    (path,) = (seed / "cache" / "score").glob("*/scores.parquet")
    write_store(tmp_path, path, np.arange(16))
    ids = pd.read_parquet(path).prompt_id.iloc[:16].unique()
    with pytest.raises(ValueError, match=rf"no log_z_hat for prompt\(s\) \['{ids[-1]}'\]"):
        Trajectories.open(tmp_path, pd.Series([0.5] * (len(ids) - 1), index=ids[:-1]))
