"""Benchmark and grader configs that say what is wrong, at validation: the benchmark, the
setting and the allowed values."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from disa.config import ConfigError, validate


@pytest.fixture(scope="module")
def make_cfg(repo):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))


def _errors(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


@pytest.fixture()
def task_cfg(make_cfg, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"problem": "echo", "tests": [{"input": "1", "output": "1"}]})
    )
    return lambda task, *o: make_cfg(
        f"task={task}",
        "backbone=hf",
        f"backbone.path={tmp_path}",
        "proposal=ref",
        f"task.root={tmp_path}",
        *o,
    )


def test_code_task_without_a_training_path_is_refused_at_validation(task_cfg):
    msg = _errors(task_cfg("code"))
    assert "task.train.path is missing; allowed: a local jsonl/json/parquet file" in msg, msg
    validate(task_cfg("code", "task.train.path=train.jsonl"))


def test_benchmark_mappings_are_checked_at_validation(task_cfg):
    msg = _errors(
        task_cfg(
            "code",
            "task.train.path=train.jsonl",
            "task.eval_benchmarks=[humanevalplus,{name: mine, path: m.json},"
            "{name: lcb, like: livecodebench, path: l.json, output_compare: exact},"
            "{name: x, like: nope, path: x.json}, mbpp]",
        )
    )
    assert (
        "task.eval_benchmarks[1]: benchmark 'mine': problem_field is missing; allowed: the field"
        in msg
    ), msg
    assert (
        "task.eval_benchmarks[2]: lcb: output_compare='exact'; allowed: ['tokens', 'lines']" in msg
    ), msg
    assert (
        "task.eval_benchmarks[3]: benchmark 'x': like='nope'; allowed: one of ['codeforces'" in msg
    ), msg
    assert (
        "task.eval_benchmarks[4]: benchmark 'mbpp' is not known; allowed: ['codeforces', 'humanevalplus'"
        in msg
    )
    # a code mapping needs no answer_field, and one named after a built-in inherits its fields
    validate(
        task_cfg(
            "code",
            "task.train.path=train.jsonl",
            "task.eval_benchmarks=[{name: codeforces, path: cf.json},"
            "{name: mine, path: m.json, problem_field: statement, tests_field: cases}]",
        )
    )
    msg = _errors(
        task_cfg(
            "math",
            "task.train.path=train.jsonl",
            "task.eval_benchmarks=[{name: aime24, path: a.jsonl, answer_extraction: regex}]",
        )
    )
    assert (
        "answer_extraction='regex'; allowed: ['field', 'first_of_list', 'last_boxed', 'gsm8k']"
        in msg
    ), msg


def test_grader_limits_may_be_null_or_set(task_cfg):
    validate(
        task_cfg(
            "code",
            "task.train.path=train.jsonl",
            "task.grader.timeout_s=1",
            "task.grader.memory_mb=256",
            "task.grader.time_limit_factor=2",
            "task.grader.min_time_limit_s=1",
        )
    )
    msg = _errors(
        task_cfg(
            "code",
            "task.train.path=train.jsonl",
            "task.grader.time_limit_factor=0.5",
            "task.grader.min_time_limit_s=0",
        )
    )
    assert "task.grader.time_limit_factor=0.5 is invalid; allowed: a number in [1, 100]" in msg, msg
    assert "task.grader.min_time_limit_s=0 is invalid" in msg, msg
