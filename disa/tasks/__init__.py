"""Prompt sources and reward functions.

A task gives prompts per split as a DataFrame (``prompt_id``, ``prompt`` plus task-specific
columns) and scores completions. Tasks whose rewarded set is enumerable (sumpairs) also
give it, which lets the harness compute the exact log Z and exact distances to the target
distribution. A task the embedded backbone can be pre-trained on gives the characters of its
texts (``alphabet``) and a corpus of (prompt, completion) pairs (``corpus``).
"""

from __future__ import annotations

import math
import numbers
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


def grade(task: Task, prompts: pd.DataFrame, completions: list[str]) -> pd.DataFrame:
    """The grades of ``completions`` (``prompts``: one row per completion) as a table:
    ``reward`` (float64; NaN = a grading failure, counted as missing, never as 0) and the
    task's own columns (a code task's sandbox guards, ``sandbox_<guard>``).

    A reward that is not a number or NaN — a string, None, an infinity — or a table of the
    wrong length is refused here, naming the task and the prompts, so that it never reaches
    a cache, a loss or a result."""
    details = getattr(task, "reward_details", None)
    if details is not None:
        table = details(prompts, completions).reset_index(drop=True)
        values = list(table["reward"]) if "reward" in table else []
    else:  # the values as the task gave them: a DataFrame would turn a None into NaN
        values = list(task.rewards(prompts, completions))
        table = pd.DataFrame(index=range(len(values)))
    if len(values) != len(completions):
        raise ValueError(
            f"task {task.name!r} gave {len(values)} rewards for {len(completions)} completions"
        )
    bad = [
        i
        for i, v in enumerate(values)
        if not isinstance(v, (numbers.Real, np.bool_)) or math.isinf(float(v))
    ]
    if bad:
        ids = prompts["prompt_id"].iloc[bad[:5]].tolist() if "prompt_id" in prompts else bad[:5]
        raise TypeError(
            f"task {task.name!r} gave {len(bad)} reward(s) that are not finite numbers or NaN, e.g. "
            f"{values[bad[0]]!r} for prompt {ids[0]!r} (prompts {ids}); allowed: a real number, or NaN "
            "for a grading failure"
        )
    table["reward"] = np.asarray(values, dtype=np.float64)
    return table


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
            name=name,
            kind=name,
            train=t.get("train"),
            eval_benchmarks=t["eval_benchmarks"],
            root=t.get("root"),
            template=t.get("template", "boxed"),
            eval_reward_mode=t.get("eval_reward_mode", "strict"),
            limit=t.get("limit"),
            grader=t.get("grader") or {},
        )
    raise ValueError(f"task.name={name!r} is not known; allowed: {list(TASK_NAMES)}")


#: the task names ``task.name`` may take
TASK_NAMES = ("sumpairs", "math", "code")
