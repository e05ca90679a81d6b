"""Bad input is refused early and by name, and nothing malformed reaches a cache or a result:
unknown settings, devices and task/backbone pairs, grader settings, machines whose sandbox
lacks a required guard, duplicate benchmarks, undecodable benchmark files, rewards that are
not numbers, a stage whose inputs were never cached, and cache files a group cannot read."""

from __future__ import annotations

import gzip
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from disa.cache import Cache, CacheError, atomic_write_bytes
from disa.config import ConfigError, validate


def _errors(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


@pytest.fixture()
def code_cfg(make_cfg, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"problem": "echo", "tests": [{"input": "1", "output": "1"}]})
    )
    return lambda *o: make_cfg(
        "task=code",
        "backbone=hf",
        f"backbone.path={tmp_path}",
        "proposal=ref",
        f"task.root={tmp_path}",
        "task.train.path=train.jsonl",
        *o,
    )


# -- settings -------------------------------------------------------------------------------
def test_unknown_top_level_key_is_refused(make_cfg):
    msg = _errors(make_cfg("+foo=1"))
    assert "foo is not a setting" in msg and "'beta'" in msg and "'algorithm'" in msg, msg
    validate(make_cfg())  # every key of the real config tree is known


@pytest.mark.parametrize("device", ["bogus", "gpu", "cuda:x", ""])
def test_bogus_device_is_refused(make_cfg, device):
    msg = _errors(make_cfg(f"device={device}"))
    assert "device=" in msg and "'cuda:N'" in msg, msg


def test_unknown_embedded_backbone_source_is_refused_at_validation(make_cfg):
    msg = _errors(make_cfg("backbone.source=bogus"))
    assert "backbone.source='bogus' is invalid; allowed: one of ['shipped', 'pretrain']" in msg, msg
    validate(make_cfg("backbone.source=pretrain"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_refused(make_cfg):
    assert "no CUDA device" in _errors(make_cfg("device=cuda"))
    validate(make_cfg("device=cpu"))


def test_task_backbone_pair_that_cannot_work_is_refused(make_cfg):
    msg = _errors(make_cfg("task=math"))
    assert (
        "task=math with backbone=embedded is not supported" in msg
        and "backbone=smollm2-135m" in msg
    ), msg


@pytest.mark.parametrize(
    ("override", "setting", "allowed"),
    [
        ("sampler.temperature=1e-300", "sampler.temperature", "[1e-3, 1e3]"),
        ("eval.sampler.temperature=1e9", "eval.sampler.temperature", "[1e-3, 1e3]"),
        ("algorithm.optimizer.lr=1e308", "algorithm.optimizer.lr", "(0, 1]"),
        (
            "algorithm=grpo algorithm.loss_args.kl_coef=1e300",
            "algorithm.loss_args.kl_coef",
            "<= 1e4",
        ),
    ],
)
def test_numbers_past_float_overflow_are_refused(make_cfg, override, setting, allowed):
    msg = _errors(make_cfg(*override.split()))
    line = next(ln for ln in msg.splitlines() if f"- {setting}=" in ln)
    assert allowed in line, line


def test_grader_settings_are_checked(code_cfg, monkeypatch):
    from disa import sandbox

    monkeypatch.setattr(sandbox, "missing_guards", lambda required=sandbox.GUARDS: [])
    validate(code_cfg())
    msg = _errors(
        code_cfg("+task.grader.timeout=1", "task.grader.memory_mb=1", "task.grader.timeout_s=-1")
    )
    assert "task.grader.timeout is not a grader setting" in msg and "'timeout_s'" in msg, msg
    assert (
        "task.grader.memory_mb=1 is invalid" in msg and "task.grader.timeout_s=-1 is invalid" in msg
    ), msg


def test_require_isolation_refuses_a_machine_without_the_guards(code_cfg, monkeypatch):
    from disa import sandbox

    monkeypatch.setattr(
        sandbox, "missing_guards", lambda required=sandbox.GUARDS: ["memory_limited"]
    )
    msg = _errors(code_cfg())
    assert (
        "require_isolation=true" in msg
        and "['memory_limited']" in msg
        and "require_isolation=false" in msg
    )
    validate(code_cfg("task.grader.require_isolation=false"))


def test_require_isolation_reaches_the_sandbox(monkeypatch):
    """With ``require_isolation`` every program of the code task is run with every guard
    required: a machine that lacks one raises instead of grading."""
    from disa import sandbox
    from disa.tasks.reasoning import BenchmarkTask

    task = BenchmarkTask("code", "code", None, [], grader={"workers": 1, "require_isolation": True})
    prompts = pd.DataFrame([{"prompt_id": "p0", "tests": [{"input": "3", "output": "3"}]}])
    monkeypatch.setattr(sandbox, "_LANDLOCK_ABI", 0)
    with pytest.raises(sandbox.SandboxUnavailable, match="reads_confined"):
        task.reward_details(prompts, ["print(input())"])
    task.grader = {"workers": 1, "require_isolation": False}
    table = task.reward_details(prompts, ["print(input())"])
    assert table.reward.tolist() == [1.0] and table.sandbox_reads_confined.tolist() == [False]


def test_duplicate_benchmark_names_are_refused(code_cfg, monkeypatch):
    from disa import sandbox

    monkeypatch.setattr(sandbox, "missing_guards", lambda required=sandbox.GUARDS: [])
    msg = _errors(code_cfg("task.eval_benchmarks=[humanevalplus,humanevalplus]"))
    assert "names ['humanevalplus'] more than once" in msg, msg


# -- files and rewards ------------------------------------------------------------------------
def test_undecodable_benchmark_files_are_named(tmp_path):
    from disa.tasks.benchmarks import load_records

    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"problem": "caf\xe9"}\n')
    whole = gzip.compress(b'{"problem": "x"}\n' * 2000)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    not_gzip = tmp_path / "plain.json.gz"
    not_gzip.write_bytes(b'{"problem": "x"}\n{"problem": ')
    for path in (bad_utf8, truncated, not_gzip):
        with pytest.raises(ValueError, match=str(path)):
            load_records(path)
    # the format is read from the content: plain JSON at a .gz path is decodable, and loads
    not_gzip.write_bytes(b'[{"problem": "x"}]')
    assert load_records(not_gzip) == [{"problem": "x"}]


class _Task:
    name = "stub"

    def __init__(self, rewards):
        self._rewards = rewards

    def rewards(self, prompts, completions):
        return self._rewards


@pytest.mark.parametrize("rewards", [["1", "0"], [1.0, None], np.array([1.0, np.inf]), [1.0]])
def test_rewards_that_are_not_numbers_are_refused(rewards):
    from disa.tasks import grade

    prompts = pd.DataFrame({"prompt_id": ["a", "b"]})
    with pytest.raises((TypeError, ValueError), match="stub"):
        grade(_Task(rewards), prompts, ["x", "y"])


def test_rewards_numbers_and_missing_grades_pass():
    from disa.tasks import grade

    got = grade(_Task([True, np.float32(0.5)]), pd.DataFrame({"prompt_id": ["a", "b"]}), ["x", "y"])
    assert got.reward.dtype == np.float64 and got.reward.tolist() == [1.0, 0.5]
    got = grade(_Task(np.array([np.nan, 0.0])), pd.DataFrame({"prompt_id": ["a", "b"]}), ["x", "y"])
    assert np.isnan(got.reward[0])  # a grading failure stays missing, never 0


def test_cache_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)  # a group-shared cache
    try:
        atomic_write_bytes(tmp_path / "a" / "file.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "file.json").stat().st_mode) == 0o664


def test_a_write_that_fails_is_an_oserror_naming_the_file(tmp_path):
    from disa.cache import atomic_write

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="file.bin") as e:
        atomic_write(tmp_path / "file.bin", fail)
    assert isinstance(e.value, CacheError) and e.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def test_tilde_in_cache_dir_reaches_wandb_as_an_absolute_path(tmp_path, monkeypatch):
    import wandb

    from disa.tracking import log_wandb_artifacts

    monkeypatch.setenv("HOME", str(tmp_path))
    cache = Cache("~/cache")
    assert cache.root == tmp_path / "cache"

    def build(a):
        a.write_table("rows", pd.DataFrame({"x": [1]}))

    art, _ = cache.build("sample", {"k": 1}, build)

    logged = []

    class Run:
        def log_artifact(self, a):
            logged.append(a)

        def use_artifact(self, a):
            logged.append(a)

    monkeypatch.setattr(wandb.Artifact, "add_reference", lambda self, uri, **kw: logged.append(uri))
    log_wandb_artifacts(Run(), {"sample.ref": art}, {})
    refs = [x for x in logged if isinstance(x, str)]
    assert refs == [f"file://{tmp_path}/cache/sample/{art.key}"]


def test_a_stage_whose_inputs_were_never_cached_is_refused_before_any_work(make_cfg, tmp_path):
    from disa.job import run

    for stage, missing in (
        ("train", ["sample", "score", "anchor"]),
        ("evaluate", ["sample", "score", "anchor", "train"]),
        ("anchor", ["sample", "score"]),
    ):
        cfg = make_cfg(
            "debug=fast", f"stage={stage}", f"cache_dir={tmp_path / 'cache'}", "logger=none"
        )
        with pytest.raises(CacheError, match="reuses cached") as e:
            run(cfg, tmp_path / stage)
        assert f"stage={stage} reuses cached {missing} artifacts" in str(e.value)
    assert not (tmp_path / "cache" / "backbone").exists()  # refused before any pre-training
