"""End-to-end runs of ``run.py`` on shrunk settings, in subprocesses like a user would."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli


def run_py(
    tmp_path: Path, name: str, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "1"}
    proc = run_cli(
        "debug=fast",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / name}",
        *overrides,
        cwd=tmp_path,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_py(tmp, "a")
    return tmp


def test_summary_has_documented_keys(first_run):
    s = summary(first_run, "a")
    for key in [
        "algorithm",
        "beta",
        "proposal.strength",
        "proposal.strength_effective",
        "anchor.mean_abs_error",
        "anchor.coverage_2se",
        "anchor.mean_ess_frac",
        "ref.mean_at_k",
        "policy.mean_at_k",
        "ref.pass_at_1",
        "policy.pass_at_4",
        "ref.coverage",
        "policy.tv_target",
        "policy.kl_rewarded",
        "train.steps",
        "time.sample_s",
        "time.total_s",
    ]:
        assert key in s, key
    assert s["train.steps"] == 5
    assert 0 <= s["anchor.coverage_2se"] <= 1
    assert s["proposal.strength_effective"] == 0.5  # round(0.5·8)/8
    run = first_run / "a"
    assert (run / "anchor.parquet").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "policy" / "config.json").exists()
    anchor = pd.read_parquet(run / "anchor.parquet")
    assert {
        "log_z_hat",
        "ess",
        "ess_frac",
        "max_weight",
        "bias",
        "se",
        "n_rewarded",
        "log_z",
    } <= set(anchor.columns)
    # the sumpairs task (debug=fast) has min_sum=0 ... max_sum=11 with 25% held out
    assert len(anchor) == 9


def test_rerun_reuses_every_artifact(first_run):
    run_py(first_run, "b")
    s = summary(first_run, "b")
    assert all(v for k, v in s.items() if k.startswith("reused.")), s
    a = summary(first_run, "a")
    assert s["policy.mean_at_k"] == a["policy.mean_at_k"]
    assert s["anchor.mean_log_z_hat"] == a["anchor.mean_log_z_hat"]


def test_beta_change_reuses_rollouts_only(first_run):
    run_py(first_run, "c", "beta=4")
    s = summary(first_run, "c")
    assert s["reused.sample"] and s["reused.score"]
    assert not s["reused.anchor"] and not s["reused.train"]
    assert s["artifact.score"] == summary(first_run, "a")["artifact.score"]
    assert s["artifact.anchor"] != summary(first_run, "a")["artifact.anchor"]


def test_single_stage_needs_its_inputs(tmp_path):
    proc = run_py(tmp_path, "x", "stage=anchor", check=False)
    assert proc.returncode != 0
    assert "run stage=sample" in proc.stderr
    run_py(tmp_path, "s", "stage=sample")
    s = summary(tmp_path, "s")
    assert "artifact.sample.ref" in s and "artifact.score" not in s


def test_bad_value_stops_before_work(tmp_path):
    proc = run_py(tmp_path, "bad", "beta=-1", "proposal.strength=2", check=False)
    assert proc.returncode != 0
    assert "beta=-1" in proc.stderr and "proposal.strength=2" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_unknown_group_option_lists_choices(tmp_path):
    proc = run_py(tmp_path, "bad", "proposal=strong", check=False)
    assert proc.returncode != 0
    assert "mixture" in proc.stderr and "ref" in proc.stderr


def test_renamed_settings_keep_working_on_the_command_line(first_run):
    """An old spelling (this release renamed ``train.*`` and ``sampler.score_batch_size``) runs,
    warns with the new spelling and means the same setting: the stage's artifact is reused."""
    proc = run_py(
        first_run, "old", "stage=score", "sampler.score_batch_size=512", "train.chunk_size=2048"
    )
    assert "sampler.score_batch_size is now scoring.batch_size" in proc.stderr
    assert "train.chunk_size is now scoring.chunk_size" in proc.stderr
    assert summary(first_run, "old")["artifact.score"] == summary(first_run, "a")["artifact.score"]
