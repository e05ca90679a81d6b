"""Prompt sources and reward functions.

A task gives prompts per split as a DataFrame (``prompt_id``, ``prompt`` plus task-specific
columns) and scores completions. Tasks whose rewarded set is enumerable (sumpairs) also
give it, which lets the harness compute the exact log Z and exact distances to the target
distribution. A task the embedded backbone can be pre-trained on gives the characters of its
texts (``alphabet``) and a corpus of (prompt, completion) pairs (``corpus``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class Task(Protocol):
    name: str

    def spec(self) -> dict[str, Any]:
        """Everything that determines prompts and rewards (hashed into cache keys)."""

    def prompts(self, split: str) -> pd.DataFrame:
        """Prompts of ``split`` ("train" or "test"): columns ``prompt_id``, ``prompt``, ..."""

    def rewards(self, prompts: pd.DataFrame, completions: list[str]) -> np.ndarray:
        """Reward of each completion; ``prompts`` has one row per completion."""


def build_task(cfg) -> Task:
    """Build the task named by ``cfg.task.name`` (validated in :mod:`disa.config`)."""
    name = cfg.task.name
    if name == "sumpairs":
        from disa.tasks.sumpairs import SumPairsTask

        return SumPairsTask(
            min_sum=cfg.task.min_sum,
            max_sum=cfg.task.max_sum,
            test_fraction=cfg.task.test_fraction,
            split_seed=cfg.task.split_seed,
            template=cfg.task.get("template", "compact"),
        )
    if name in ("math", "code"):
        from omegaconf import OmegaConf

        from disa.tasks.reasoning import BenchmarkTask

        t = OmegaConf.to_container(cfg.task, resolve=True)
        return BenchmarkTask(
            name=name, kind=name, train=t.get("train"), eval_benchmarks=t["eval_benchmarks"],
            root=t.get("root"), template=t.get("template", "boxed"),
            eval_reward_mode=t.get("eval_reward_mode", "strict"), limit=t.get("limit"),
            grader=t.get("grader") or {},
        )
    raise ValueError(f"task.name={name!r} is not known; allowed: {list(TASK_NAMES)}")


#: the task names ``task.name`` may take
TASK_NAMES = ("sumpairs", "math", "code")
