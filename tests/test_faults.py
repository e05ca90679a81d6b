"""Fault injection: a killed job, a corrupted file, a config typo or a bad value never
silently changes a result (issue 6, "Nothing lost").

Every test injects one fault and asserts what survived (files, rows, weights) and what the
user was told (the message). Subprocess tests run ``run.py`` as a user would and kill it
with SIGKILL (no cleanup handler runs); in-process tests monkeypatch ``os.replace`` or the
task to simulate a full disk or a bad reward.

One uninterrupted run of every stage (the ``seed`` fixture) gives the reference results;
each test starts from a fresh cache holding copies of the seed's artifacts it does not
test (at least the pre-trained embedded backbone), so that no test pre-trains again.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fs_support import tmpfs

from disa.cache import Cache, CacheError
from disa.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
#: settings of every run here: the tiny debug models, one prompt per sampling shard (so a
#: killed sampling job has shards to lose), 9 training prompts × K=8 per mixture component,
#: and 20 training steps with a checkpoint every 5 (so a killed training job has one)
BASE = (
    "debug=fast",
    "sampler.prompts_per_shard=1",
    "trainer.max_steps=20",
    "checkpoint.every_n_steps=5",
)
N_TRAIN_PROMPTS, K = 9, 8
ROW = ["prompt_id", "component", "sample_idx"]  # identifies a trajectory


# -- helpers -----------------------------------------------------------------------------------
def _cmd(cache: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "run.py"),
        *BASE,
        f"cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    # one intra-op thread: the models are tiny, and two busy jobs on two cores with two
    # OpenMP threads each slow down by orders of magnitude
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "TQDM_DISABLE": "1",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",
    }


def run_py(
    cache: Path, run_dir: Path, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    """``python run.py`` in a subprocess (as in tests/test_pipeline.py)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        _cmd(cache, run_dir, *overrides),
        cwd=run_dir.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_py(cache: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        _cmd(cache, run_dir, *overrides),
        cwd=run_dir.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if the job ended first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the job ended (rc={proc.returncode}) before {what}:\n{proc.communicate()[0][-4000:]}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def manifest(art_dir: Path) -> dict:
    return json.loads((art_dir / "manifest.json").read_text())


def builds(art_dir: Path) -> list[dict]:
    """The artifact's build journal: one ``start`` per build attempt, one ``finish`` per build."""
    journal = art_dir / ".builds.jsonl"
    return (
        [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    )


def rollouts(cache: Path, key: str) -> pd.DataFrame:
    """The trajectories of sample artifact ``key``, read (and verified) through the cache."""
    art = Cache(cache).artifact("sample", manifest(cache / "sample" / key)["spec"])
    assert art.key == key
    return art.read_shards()


def fresh_cache(
    seed: Path, dst: Path, stages: tuple[str, ...] = ("backbone",), skip_model: str | None = None
) -> Path:
    """A new cache holding copies of the seed cache's ``stages`` (less the artifacts whose
    spec names the model ``skip_model``)."""
    for stage in stages:
        for art in (seed / "cache" / stage).iterdir():
            if skip_model is None or manifest(art)["spec"].get("model") != skip_model:
                shutil.copytree(art, dst / stage / art.name)
    return dst


def file_ids(paths) -> dict[Path, tuple[int, int]]:
    """(inode, mtime_ns) per file: a file rewritten by an atomic rename gets a new inode."""
    return {Path(p): (Path(p).stat().st_ino, Path(p).stat().st_mtime_ns) for p in paths}


def compose(*overrides: str):
    """The config that ``run.py *BASE *overrides`` runs with (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[*BASE, *overrides])


def run_inproc(cache: Path, run_dir: Path, *overrides: str) -> dict:
    """``disa.job.run`` in this process, so that a test can monkeypatch what it calls."""
    from disa.job import run

    return run(compose(f"cache_dir={cache}", *overrides), run_dir)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """One uninterrupted run of every stage in a fresh cache: the reference results."""
    tmp = tmp_path_factory.mktemp("seed")
    run_py(tmp / "cache", tmp / "run")
    return tmp


@pytest.fixture(scope="module")
def ref(seed) -> dict:
    return summary(seed / "run")


# == 1. sampling killed after some shards: resumes from them, same rollouts ====================
def test_killed_sampling_resumes_from_its_shards(seed, ref, tmp_path):
    cache = fresh_cache(seed, tmp_path / "cache")
    proc = start_py(cache, tmp_path / "killed", "stage=sample")
    shards = lambda: sorted((cache / "sample").glob("*/shards/part-*.parquet"))  # noqa: E731
    kill_when(proc, lambda: len(shards()) >= 2, "two shards were written")
    survivors = file_ids(shards())
    interrupted = [d for d in (cache / "sample").iterdir() if not (d / "manifest.json").exists()]
    assert interrupted, "the job was killed after sampling had finished: nothing was interrupted"

    proc = run_py(cache, tmp_path / "resumed", "stage=sample")
    got = summary(tmp_path / "resumed")
    # what the user is told: the build resumed from the shards it found
    assert "resuming an interrupted build from" in proc.stdout + proc.stderr
    # what survived: the shards written before the kill were kept, not recomputed or rewritten
    assert file_ids(survivors) == survivors
    for d in interrupted:
        attempts = builds(d)
        assert [b["event"] for b in attempts] == ["start", "start", "finish"]
        assert attempts[1]["shards_found"] == sum(p.parent.parent == d for p in survivors) >= 1
    # the result: exactly the rollouts of the uninterrupted run (sampling is seeded per shard),
    # no trajectory missing, none twice
    for comp in ("ref", "proposal"):
        key = got[f"artifact.sample.{comp}"]
        assert key == ref[f"artifact.sample.{comp}"]
        rows = rollouts(cache, key)
        assert len(rows) == N_TRAIN_PROMPTS * K and not rows.duplicated(ROW).any()
        pd.testing.assert_frame_equal(rows, rollouts(seed / "cache", key))
    assert not list(cache.rglob("*.tmp"))  # no temp file left (one of the killed writer is removed)


# == 2. a truncated or bit-flipped file of a finished artifact is reported, never used =========
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x10  # same size, one bit different
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("target", ["sample shard", "score table", "anchor table"])
def test_corrupted_artifact_file_stops_the_run(seed, ref, tmp_path, target, how):
    cache = tmp_path / "cache"
    shutil.copytree(seed / "cache", cache)
    victim = {
        "sample shard": cache
        / "sample"
        / ref["artifact.sample.proposal"]
        / "shards"
        / "part-00004.parquet",
        "score table": cache / "score" / ref["artifact.score"] / "scores.parquet",
        "anchor table": cache / "anchor" / ref["artifact.anchor"] / "anchor.parquet",
    }[target]
    _damage(victim, how)
    damaged, before = victim.read_bytes(), sorted(p for p in cache.rglob("*") if p.is_file())

    with pytest.raises(CacheError) as err:
        run_inproc(cache, tmp_path / "run", "stage=anchor")
    # the message names the file and says what to do
    assert str(victim) in str(err.value)
    assert "does not match its manifest checksum" in str(err.value) and "delete" in str(err.value)
    # nothing was rebuilt over it or next to it
    assert victim.read_bytes() == damaged
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == before


def test_corrupted_shard_of_an_interrupted_build_is_not_resumed_from(
    seed, ref, tmp_path, monkeypatch
):
    """Disk full at shard 3 (5.), then shard 1 damaged: the resume refuses it by name."""
    from disa import cache as cache_mod

    cache = fresh_cache(seed, tmp_path / "cache")
    real_replace = os.replace

    def disk_full_at_shard_3(src, dst):
        if Path(dst).name == "part-00003.parquet":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", disk_full_at_shard_3)
    with pytest.raises(CacheError) as err:
        run_inproc(cache, tmp_path / "run", "stage=sample")
    monkeypatch.undo()
    (art,) = (cache / "sample").iterdir()  # π_ref's rollouts, interrupted at shard 3
    assert f"could not write {art / 'shards' / 'part-00003.parquet'}" in str(err.value)
    assert "No space left on device" in str(err.value)
    assert sorted(p.name for p in (art / "shards").glob("*.parquet")) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
    assert not (art / "manifest.json").exists() and not list(art.rglob("*.tmp"))

    _damage(art / "shards" / "part-00001.parquet", "bitflip")
    with pytest.raises(CacheError) as err:
        run_inproc(cache, tmp_path / "run", "stage=sample")
    assert f"shard {art / 'shards' / 'part-00001.parquet'} does not match the checksum" in str(
        err.value
    )
    assert not (art / "manifest.json").exists()  # not sealed into a "complete" artifact

    (art / "shards" / "part-00001.parquet").unlink()  # what the message says to do
    got = run_inproc(cache, tmp_path / "run", "stage=sample")
    for comp in ("ref", "proposal"):
        pd.testing.assert_frame_equal(
            rollouts(cache, got[f"artifact.sample.{comp}"]),
            rollouts(seed / "cache", ref[f"artifact.sample.{comp}"]),
        )


# == 3. a changed model, tokenizer, sampler setting or task version gives new cache keys =====
def _hf_copy(seed: Path, dst: Path) -> Path:
    """The embedded π_ref as a plain local transformers directory (for backbone=hf)."""
    (src,) = (seed / "cache" / "backbone").glob("*/ref")
    shutil.copytree(src, dst)
    return dst


HF = (
    "backbone=hf",
    "backbone.dtype=float32",
    "proposal=ref",
    "stage=sample",
    "sampler.prompts_per_shard=16",
)


def test_changed_tokenizer_gives_new_rollout_key(seed, tmp_path):
    from disa.models import fingerprint

    model = _hf_copy(seed, tmp_path / "model")
    edited = _hf_copy(seed, tmp_path / "model-edited-tokenizer")
    cfg = json.loads((edited / "tokenizer_config.json").read_text())
    (edited / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 24}))
    cache = tmp_path / "cache"

    a = run_inproc(cache, tmp_path / "a", *HF, f"backbone.path={model}")
    again = run_inproc(cache, tmp_path / "again", *HF, f"backbone.path={model}")
    b = run_inproc(cache, tmp_path / "b", *HF, f"backbone.path={edited}")
    # control: the same model directory reuses its rollouts...
    assert again["reused.sample"] and again["artifact.sample.ref"] == a["artifact.sample.ref"]
    # ...the edited tokenizer does not: new fingerprint, new key, sampled afresh
    assert fingerprint(edited) != fingerprint(model)
    assert b["artifact.sample.ref"] != a["artifact.sample.ref"] and not b["reused.sample"]


def test_model_fingerprint_is_content_not_location(seed, tmp_path):
    from transformers import AutoModelForCausalLM

    from disa.models import fingerprint

    model = _hf_copy(seed, tmp_path / "model")
    moved = _hf_copy(seed, tmp_path / "elsewhere" / "same-model")
    # download metadata under a hidden directory is not the model
    (moved / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (moved / ".cache" / "huggingface" / "download" / "model.safetensors.metadata").write_text(
        "etag 1234"
    )
    assert fingerprint(moved) == fingerprint(model)

    changed = _hf_copy(seed, tmp_path / "changed")
    m = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-3  # one weight
    m.save_pretrained(changed)
    assert fingerprint(changed) != fingerprint(model)


def test_changed_embedded_backbone_file_is_reported(seed, tmp_path):
    """The embedded backbone lives in the cache: an edited tokenizer there is corruption."""
    cache = fresh_cache(seed, tmp_path / "cache")
    (tok,) = (cache / "backbone").glob("*/ref/tokenizer_config.json")
    tok.write_text(tok.read_text().replace('"padding_side": "left"', '"padding_side": "right"'))
    with pytest.raises(CacheError, match=re.escape(str(tok))):
        run_inproc(cache, tmp_path / "run", "stage=sample")
    assert not (cache / "sample").exists()


def test_changed_sampler_setting_gives_new_rollout_keys(seed, ref, tmp_path):
    cache = fresh_cache(seed, tmp_path / "cache", ("backbone", "sample"))
    same = run_inproc(cache, tmp_path / "same", "stage=sample")
    assert same["reused.sample"] and same["artifact.sample.ref"] == ref["artifact.sample.ref"]
    hot = run_inproc(cache, tmp_path / "hot", "stage=sample", "sampler.temperature=0.7")
    assert not hot["reused.sample"]
    for comp in ("ref", "proposal"):
        assert hot[f"artifact.sample.{comp}"] != ref[f"artifact.sample.{comp}"]
        assert (
            manifest(cache / "sample" / hot[f"artifact.sample.{comp}"])["spec"]["sampler"][
                "temperature"
            ]
            == 0.7
        )


def test_changed_task_version_gives_new_rollout_keys(seed, ref, tmp_path):
    """A task whose reward or prompt format changed bumps ``version``: no rollout is reused.
    (Through run.py the embedded backbone, pre-trained on the task, would be rebuilt too; the
    sample stage is called directly here so the test does not pre-train again.)"""
    from disa import stages
    from disa.models import resolve_backbone
    from disa.settings import Settings
    from disa.stages import sample
    from disa.tasks import build_task

    cache = Cache(fresh_cache(seed, tmp_path / "cache", ("backbone", "sample")))
    cfg = compose(f"cache_dir={cache.root}", "stage=sample")
    task = build_task(cfg)
    backbone = resolve_backbone(cfg, task, cache)
    same = stages.Context(
        Settings.from_config(cfg), cfg, cache, task, backbone, tmp_path / "run", torch.device("cpu")
    )
    # control
    assert {c: a.key for c, a in sample.run(same).items()} == {
        c: ref[f"artifact.sample.{c}"] for c in ("ref", "proposal")
    } and same.reused["sample"]
    v2 = dataclasses.replace(task, version=task.version + 1)
    ctx = stages.Context(
        Settings.from_config(cfg), cfg, cache, v2, backbone, tmp_path / "run", torch.device("cpu")
    )
    arts = sample.run(ctx)
    assert ctx.reused["sample"] is False
    for comp, art in arts.items():
        assert art.key != ref[f"artifact.sample.{comp}"]
        assert art.manifest()["spec"]["task"]["version"] == task.version + 1


# == 4. two jobs on one cache at once: each artifact built once, same results ==================
def test_concurrent_jobs_build_each_artifact_once(seed, ref, tmp_path):
    cache = fresh_cache(seed, tmp_path / "cache")
    jobs = [start_py(cache, tmp_path / f"job{i}", "trainer.max_steps=5") for i in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, out in zip(jobs, outputs):
        assert job.returncode == 0, out[-4000:]
    a, b = summary(tmp_path / "job0"), summary(tmp_path / "job1")

    built_by: dict[int, int] = {}
    for art in (
        p for stage in cache.iterdir() if stage.name != "backbone" for p in stage.iterdir()
    ):
        attempts = builds(art)
        # one build, by one of the two jobs; the manifest names the process that built it
        assert [x["event"] for x in attempts] == ["start", "finish"], (art, attempts)
        assert manifest(art)["built_by"]["pid"] == attempts[0]["pid"] in {j.pid for j in jobs}
        built_by[attempts[0]["pid"]] = built_by.get(attempts[0]["pid"], 0) + 1
    # neither read a half-written artifact: both report the same results
    results = {k for k in a if not k.startswith(("time.", "reused.")) and k != "train.wall_s"}
    assert {k: a[k] for k in results} == {k: b[k] for k in results}
    # ...which are those of a run alone, where they overlap (same rollouts, scores, anchor)
    for k in ("artifact.sample.ref", "artifact.score", "artifact.anchor", "anchor.mean_log_z_hat"):
        assert a[k] == ref[k]


# == 5. a write that fails (disk full) keeps the previous file and names the failing one ======
def test_disk_full_keeps_previous_artifacts_and_files(seed, ref, tmp_path, monkeypatch):
    from disa import cache as cache_mod

    cache = tmp_path / "cache"
    shutil.copytree(seed / "cache", cache)
    run_dir = tmp_path / "run"
    first = run_inproc(cache, run_dir, "stage=anchor")
    old_anchor = cache / "anchor" / ref["artifact.anchor"]
    old_bytes = (old_anchor / "anchor.parquet").read_bytes()
    old_summary = (run_dir / "summary.json").read_bytes()
    real_replace = os.replace

    def disk_full(names):
        def replace(src, dst):
            if Path(dst).name in names:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst)

        return replace

    # (a) the new anchor table (β=3) cannot be written: the new artifact stays incomplete
    monkeypatch.setattr(cache_mod.os, "replace", disk_full({"anchor.parquet"}))
    with pytest.raises(CacheError, match="No space left on device") as err:
        run_inproc(cache, run_dir, "stage=anchor", "beta=3")
    (new_anchor,) = [d for d in (cache / "anchor").iterdir() if d != old_anchor]
    assert f"could not write {new_anchor / 'anchor.parquet'}" in str(err.value)
    assert not (new_anchor / "manifest.json").exists() and not list(new_anchor.glob("*.parquet*"))
    assert (old_anchor / "anchor.parquet").read_bytes() == old_bytes  # the β=2 anchor is intact

    # (b) the manifest cannot be written: the artifact is not complete, so it is never used
    monkeypatch.setattr(cache_mod.os, "replace", disk_full({"manifest.json"}))
    with pytest.raises(
        CacheError, match=re.escape(f"could not write {new_anchor / 'manifest.json'}")
    ):
        run_inproc(cache, run_dir, "stage=anchor", "beta=3")
    assert not (new_anchor / "manifest.json").exists()

    # (c) the run's own summary.json cannot be replaced: the previous one stays as it was
    monkeypatch.setattr(cache_mod.os, "replace", disk_full({"summary.json"}))
    with pytest.raises(CacheError, match=re.escape(f"could not write {run_dir / 'summary.json'}")):
        run_inproc(cache, run_dir, "stage=anchor", "beta=3")
    assert (run_dir / "summary.json").read_bytes() == old_summary

    monkeypatch.undo()  # space again: both complete, and the β=2 anchor is what it was
    third = run_inproc(cache, run_dir, "stage=anchor", "beta=3")
    assert third["artifact.anchor"] == new_anchor.name and third["reused.anchor"]  # built in (c)
    again = run_inproc(cache, tmp_path / "again", "stage=anchor")
    assert again["reused.anchor"] and again["artifact.anchor"] == first["artifact.anchor"]
    assert again["anchor.mean_log_z_hat"] == first["anchor.mean_log_z_hat"]
    assert not list(cache.rglob("*.tmp"))


# == 6. non-finite rewards or log-probs are refused by prompt; degenerate prompts are flagged ==
def _scores(n_prompts: int = 3, k: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt_id": f"p{i}",
            "component": "ref",
            "sample_idx": j,
            "reward": float(j == 0),
            "logp_ref": -3.0 + rng.normal(),
            "logq_ref": 0.0,
        }
        for i in range(n_prompts)
        for j in range(k)
    ]
    df = pd.DataFrame(rows)
    df["logq_ref"] = df.logp_ref
    return df


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("reward", np.nan),
        ("reward", np.inf),
        ("logp_ref", np.nan),
        ("logp_ref", -np.inf),
        ("logq_ref", np.nan),
    ],
)
def test_non_finite_value_is_refused_naming_the_prompt(column, value):
    from disa.anchor import build_anchor

    df = _scores()
    df.loc[(df.prompt_id == "p1") & (df.sample_idx == 2), column] = value
    with pytest.raises(ValueError) as err:
        build_anchor(df, beta=2.0, K=4, strength=0.0)
    assert "['p1']" in str(err.value) and "non-finite" in str(err.value)
    assert column in str(err.value) or "log_mu" in str(err.value)  # logq_ref enters as log μ


def test_nan_reward_in_the_pipeline_is_refused_and_not_cached(seed, tmp_path, monkeypatch):
    from disa.tasks import build_task
    from disa.tasks.sumpairs import SumPairsTask

    cache = fresh_cache(seed, tmp_path / "cache", ("backbone", "sample", "oracle"))
    pid = build_task(compose()).prompts("train").prompt_id.iloc[2]
    real = SumPairsTask.rewards

    def broken_verifier(self, prompts, completions):
        r = real(self, prompts, completions)
        r[(prompts.prompt_id == pid).to_numpy()] = np.nan
        return r

    monkeypatch.setattr(SumPairsTask, "rewards", broken_verifier)
    with pytest.raises(ValueError) as err:
        run_inproc(cache, tmp_path / "run", "stage=score")
    # 2 × K trajectories of that prompt: K from π_ref and K from the proposal model
    assert f"non-finite reward for {2 * K} trajectories (prompt ids ['{pid}'])" in str(err.value)
    (score,) = (cache / "score").iterdir()
    assert not (score / "manifest.json").exists()  # nothing cached: a fixed verifier rescored


def test_degenerate_prompt_is_flagged_and_counted():
    from disa.anchor import anchor_summary, build_anchor

    df = _scores(n_prompts=3, k=8)
    df["reward"] = 0.0
    df.loc[df.prompt_id == "p2", "logp_ref"] = -50.0
    df.loc[(df.prompt_id == "p2") & (df.sample_idx == 0), "logp_ref"] = -1.0  # one weight dominates
    df["logq_ref"] = -3.0  # μ ≠ π_ref: the importance weights are uneven
    table = build_anchor(df, beta=2.0, K=8, strength=0.0, min_ess=2.0)
    p2 = table.set_index("prompt_id").loc["p2"]
    assert p2.ess == pytest.approx(1.0) and bool(p2.degenerate)
    assert table.degenerate.tolist() == [False, False, True]
    assert anchor_summary(table)["anchor.degenerate_prompts"] == 1


def test_degenerate_prompts_counted_in_run_summary(seed, ref, tmp_path):
    cache = fresh_cache(seed, tmp_path / "cache", ("backbone", "sample", "score", "oracle"))
    got = run_inproc(cache, tmp_path / "run", "stage=anchor", "proposal.min_ess=4")
    table = pd.read_parquet(tmp_path / "run" / "anchor.parquet")
    assert table.degenerate.tolist() == (table.ess < 4).tolist()
    assert (
        got["anchor.degenerate_prompts"]
        == int((table.ess < 4).sum())
        > ref["anchor.degenerate_prompts"]
    )


# == 7. training killed mid-way resumes from its last checkpoint, to the same result ==========
def _policy_weights(train_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(train_dir / "policy" / "model.safetensors"))


def test_killed_training_resumes_to_the_same_result(seed, ref, tmp_path):
    # everything but training is copied; the policy's evaluation is keyed by the trained
    # weights, so it is reused only because the resumed weights come out bit-identical
    cache = fresh_cache(
        seed, tmp_path / "cache", ("backbone", "sample", "score", "oracle", "anchor", "evaluate")
    )
    proc = start_py(cache, tmp_path / "killed")
    last = lambda: next(iter((cache / "train").glob("*/checkpoints/last.ckpt")), None)  # noqa: E731
    kill_when(proc, lambda: last() is not None, "a checkpoint was written")
    (train_dir,) = (cache / "train").iterdir()
    assert not (train_dir / "manifest.json").exists()  # killed before training finished
    step_at_kill = torch.load(last(), map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 20

    proc = run_py(cache, tmp_path / "resumed")
    got = summary(tmp_path / "resumed")
    assert "Restoring states from the checkpoint path" in proc.stdout + proc.stderr
    assert got["train.resumed"] is True and got["train.steps"] == 20
    assert got["artifact.train"] == ref["artifact.train"] and not ref["train.resumed"]
    # Tolerance: none. On CPU the resumed run trains on the same batches in the same order,
    # from the same weights and optimizer state, so it ends bit-identical to the uninterrupted one.
    assert got["train.loss"] == ref["train.loss"]
    assert got["policy.mean_at_k"] == ref["policy.mean_at_k"]
    w_ref, w_got = (
        _policy_weights(seed / "cache" / "train" / ref["artifact.train"]),
        _policy_weights(train_dir),
    )
    assert w_ref.keys() == w_got.keys()
    max_diff = max(float((w_ref[k] - w_got[k]).abs().max()) for k in w_ref)
    assert max_diff == 0.0, f"max |Δw| = {max_diff} after resuming from step {step_at_kill}"


def test_training_on_a_full_filesystem_fails_cleanly_and_resumes_exactly(seed, ref, tmp_path):
    """The cache on a small tmpfs (another filesystem than the temp dir): the first
    checkpoint fits, the second does not. The job fails naming the file, leaves no
    truncated checkpoint and no temp file, seals nothing; given room, the next job resumes
    from the last whole checkpoint to the uninterrupted run's result."""
    inputs = ("backbone", "sample", "score", "oracle", "anchor", "evaluate")
    used = sum(
        f.stat().st_size for st in inputs for f in (seed / "cache" / st).rglob("*") if f.is_file()
    )
    ckpt = (
        (seed / "cache" / "train" / ref["artifact.train"] / "checkpoints" / "last.ckpt")
        .stat()
        .st_size
    )
    # room for the inputs, a step checkpoint and last.ckpt, not for the next step's checkpoint
    with tmpfs(tmp_path / "cache", f"{(used + int(2.5 * ckpt)) // 1024}k") as cache:
        fresh_cache(seed, cache, inputs)
        proc = run_py(cache, tmp_path / "full", check=False)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "No space left on device" in out and "could not write" in out, out[-3000:]
        (train_dir,) = (cache / "train").iterdir()
        assert not (train_dir / "manifest.json").exists()  # nothing sealed
        assert not list(cache.rglob("*.tmp"))  # the failed write's temp file is gone
        for ckpt in train_dir.glob("checkpoints/*.ckpt"):
            # every checkpoint left is whole
            torch.load(ckpt, map_location="cpu", weights_only=False)
        subprocess.run(["mount", "-o", "remount,size=256m", str(cache)], check=True)
        run_py(cache, tmp_path / "resumed")
        got = summary(tmp_path / "resumed")
        assert got["train.resumed"] is True and got["train.steps"] == 20
        assert (
            got["train.loss"] == ref["train.loss"]
            and got["policy.mean_at_k"] == ref["policy.mean_at_k"]
        )
        for manifest_path in cache.rglob("manifest.json"):  # every sealed file verifies
            art = Cache(cache).artifact(
                manifest_path.parent.parent.name, manifest(manifest_path.parent)["spec"]
            )
            art.verify()


def test_batch_order_is_a_function_of_the_step():
    """What makes 7. hold: the data module starts at the batch the checkpoint got to."""
    from disa.training.data import StepBatches

    whole = StepBatches(10, 4, seed=3, drop_last=True)
    stream = iter(whole)
    first = [next(stream) for _ in range(7)]  # 2 batches per pass: passes 0..3
    assert all(len(b) == 4 for b in first) and first[0] != first[2]  # reshuffled every pass
    for s in range(7):  # a run resumed at batch s continues exactly where the stream was
        resumed = iter(StepBatches(10, 4, seed=3, drop_last=True, start=lambda s=s: s))
        assert [next(resumed) for _ in range(7 - s)] == first[s:]
    assert next(iter(StepBatches(10, 4, seed=4, drop_last=True))) != first[0]
    # two DDP processes: disjoint halves of one batch of 2 × 4, a function of the step alike
    ranks = [iter(StepBatches(20, 4, seed=3, drop_last=True, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(5):
        a, b = next(ranks[0]), next(ranks[1])
        assert len(a) == len(b) == 4 and not set(a) & set(b)


# == 8. bad input is refused before any model is loaded or any file written ==================
GROUPS = ["backbone", "task", "proposal", "algorithm", "sampler", "trainer", "logger", "eval"]


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_group_option_lists_the_valid_ones(group):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose(f"{group}=no_such_option")
    msg = str(err.value)
    assert f"Could not find '{group}/no_such_option'" in msg
    for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
        assert f"\t{option}\n" in msg + "\n", (option, msg)


def test_misspelt_setting_is_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose("sampler.temprature=0.5")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "sampler.prompts_per_shard=0",
            "sampler.prompts_per_shard=0 is invalid; allowed: an integer >= 1",
        ),
        (
            "checkpoint.every_n_steps=0",
            "checkpoint.every_n_steps=0 is invalid; allowed: an integer >= 1",
        ),
        ("trainer.max_steps=-5", "trainer.max_steps=-5 is invalid; allowed: an integer >= 1"),
        (
            "sampler.temperature=-1",
            "sampler.temperature=-1 is invalid; allowed: a number in [1e-3, 1e3]",
        ),
        ("proposal.min_ess=0.5", "proposal.min_ess=0.5 is invalid; allowed: a number >= 1"),
        ("beta=nan", "beta=nan is invalid; allowed: a number in (0, 1e4]"),
        ("proposal.strength=nan", "proposal.strength=nan is invalid; allowed: a number in [0, 1]"),
        ("task.test_fraction=1.5", "task.test_fraction=1.5; allowed: a number in (0, 1)"),
    ],
)
def test_out_of_range_value_is_refused_before_any_work(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "cache", tmp_path / "run", override)
    assert expected in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_infinite_beta_is_refused():
    from disa.config import validate

    with pytest.raises(ConfigError, match="beta=inf"):
        validate(compose("beta=inf"))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model or tokenizer is loaded (every load goes through these)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_missing_model_path_is_refused_before_any_work(tmp_path, no_model_loads):
    missing = tmp_path / "models" / "no-such-model"
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "cache", tmp_path / "run", "backbone=hf", f"backbone.path={missing}")
    assert f"backbone.path='{missing}' does not exist; allowed: a local model directory" in str(
        err.value
    )
    assert not (tmp_path / "cache").exists()


def test_empty_prompt_set_is_refused_before_any_work(tmp_path, monkeypatch, no_model_loads):
    from disa.tasks.sumpairs import SumPairsTask

    real = SumPairsTask.prompts
    monkeypatch.setattr(SumPairsTask, "prompts", lambda self, split: real(self, split).iloc[:0])
    with pytest.raises(ValueError, match="task 'sumpairs' has no 'train' prompts"):
        run_inproc(tmp_path / "cache", tmp_path / "run")
    assert not (tmp_path / "cache").exists()


# == gaps found by fault injection, now closed ==============================================
def test_resume_with_another_shard_size_does_not_mix_layouts(seed, ref, tmp_path):
    cache = fresh_cache(seed, tmp_path / "cache")
    run_inproc(cache, tmp_path / "a", "stage=sample", "sampler.prompts_per_shard=4")
    for art in (cache / "sample").iterdir():  # as if killed after two shards of 4 prompts
        (art / "manifest.json").unlink()
        for p in (art / "shards").glob("part-*.parquet"):
            if p.name >= "part-00002":
                p.unlink()
    got = run_inproc(cache, tmp_path / "b", "stage=sample")  # prompts_per_shard=1 (BASE)
    for comp in ("ref", "proposal"):
        rows = rollouts(cache, got[f"artifact.sample.{comp}"])
        assert not rows.duplicated(ROW).any() and len(rows) == N_TRAIN_PROMPTS * K


def test_changed_dtype_gives_new_rollout_key(seed, tmp_path):
    model = _hf_copy(seed, tmp_path / "model")
    hf = [o for o in HF if not o.startswith("backbone.dtype")]
    a = run_inproc(
        tmp_path / "cache", tmp_path / "a", *hf, f"backbone.path={model}", "backbone.dtype=float32"
    )
    b = run_inproc(
        tmp_path / "cache", tmp_path / "b", *hf, f"backbone.path={model}", "backbone.dtype=bfloat16"
    )
    assert b["artifact.sample.ref"] != a["artifact.sample.ref"]
