"""Real benchmarks as tasks: math (graded by math-verify) and code (graded in a sandbox).

Training prompts come from one local source (jsonl/json/parquet, field mapping in the
config); evaluation prompts are the configured benchmark suite, kept separate. Every row
carries its ``benchmark`` so that metrics are reported per benchmark and macro-averaged,
and its ``reward_mode``: training rewards are strict (a boxed or marked answer is
required), evaluation grading is configurable.

A grading failure (timeout, crashed worker, unparsable gold) gives a NaN reward: the anchor
refuses it with the prompt id, evaluation counts it as missing; it is never a zero.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from disa.tasks.benchmarks import (
    CODE_BENCHMARKS,
    MATH_BENCHMARKS,
    load_benchmark,
    render_prompt,
    resolve_entry,
)


@dataclass
class BenchmarkTask:
    """Prompts from local benchmark files; rewards from a grader (math or code)."""

    name: str
    kind: str  # "math" | "code"
    train: Mapping[str, Any] | None
    eval_benchmarks: Sequence[str | Mapping[str, Any]]
    root: str | None = None
    template: str = "boxed"
    eval_reward_mode: str = "strict"
    limit: int | None = None
    grader: Mapping[str, Any] = field(default_factory=dict)
    version: int = 3  # 3: rewards by the reference evaluators' rules (README, "How grading works")
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)
    # loaded once per split: the stages, the rewards and the cache keys all ask for the rows
    _frames: dict[str, pd.DataFrame] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def spec(self) -> dict[str, Any]:
        """The task's identity in cache keys: its settings and a digest of the prompt rows
        themselves, so that an edited benchmark file or a hub dataset that changed upstream
        gives new artifacts instead of silently reusing old ones."""
        return {
            "name": self.name,
            "kind": self.kind,
            "train": dict(self.train) if self.train else None,
            "eval": [e if isinstance(e, str) else dict(e) for e in self.eval_benchmarks],
            "template": self.template,
            "eval_reward_mode": self.eval_reward_mode,
            "limit": self.limit,
            "version": self.version,
            "data": self.data_digest(),
            # the settings a reward depends on (not how many graders run, nor the guards required)
            "grader": {
                k: v
                for k, v in dict(self.grader).items()
                if k not in ("workers", "require_isolation")
            },
        }

    def data_digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for split in ("train", "test") if self.train else ("test",):
                df = self.prompts(split)
                cols = [
                    c
                    for c in (
                        "prompt_id",
                        "prompt",
                        "gold",
                        "tests",
                        "fn_name",
                        "output_compare",
                        "float_tolerance",
                        "prelude",
                        "time_limit_s",
                        "memory_limit_mb",
                        "base_input",
                        "plus_input",
                        "atol",
                        "expected",
                    )
                    if c in df
                ]
                h.update(
                    json.dumps(df[cols].to_dict("records"), sort_keys=True, default=str).encode()
                )
            self._digest = h.hexdigest()[:16]
        return self._digest

    def _load(self, entries: Sequence, mode: str) -> pd.DataFrame:
        known = MATH_BENCHMARKS if self.kind == "math" else CODE_BENCHMARKS
        frames = [
            load_benchmark(resolve_entry(e, known, self.kind), self.root, limit=self.limit)
            for e in entries
        ]
        df = pd.concat(frames, ignore_index=True)
        df["prompt"] = [self._render(r) for r in df.to_dict("records")]
        df["reward_mode"] = mode
        return df

    def _render(self, row: Mapping[str, Any]) -> str:
        # HumanEval-style prompts are code to be completed, not questions for a template
        if self.kind == "code" and isinstance(row.get("entry_point"), str):
            return row["problem"]
        return render_prompt(row["problem"], self.template)

    def prompts(self, split: str) -> pd.DataFrame:
        if split not in self._frames:
            if split == "train":
                if not self.train:
                    raise ValueError(
                        f"task={self.name} has no training source: set task.train.path"
                    )
                self._frames[split] = self._load([self.train], "strict")
            elif split == "test":
                self._frames[split] = self._load(self.eval_benchmarks, self.eval_reward_mode)
            else:
                raise ValueError(f"split={split!r}; allowed: ['train', 'test']")
        return self._frames[split].copy()

    def rewards(self, prompts: pd.DataFrame, completions: list[str]) -> np.ndarray:
        if self.kind == "math":
            from disa.tasks.math_reward import grade

            out = np.full(len(completions), np.nan)
            for mode in prompts.reward_mode.unique():
                sel = np.flatnonzero((prompts.reward_mode == mode).to_numpy())
                got = grade(
                    [prompts.gold.iloc[i] for i in sel],
                    [completions[i] for i in sel],
                    mode=mode,
                    timeout_s=float(self.grader.get("timeout_s") or 5.0),
                    workers=int(self.grader.get("workers") or 2),
                )
                out[sel] = [np.nan if g is None else g for g in got]
            return out
        return self.reward_details(prompts, completions)["reward"].to_numpy()

    def reward_details(self, prompts: pd.DataFrame, completions: list[str]) -> pd.DataFrame:
        """``reward`` and, for code, the sandbox guards that confined each graded program
        (``sandbox_<guard>``; None where no program ran)."""
        if self.kind == "math":
            return pd.DataFrame({"reward": self.rewards(prompts, completions)})
        from disa.sandbox import GUARDS
        from disa.tasks.code_reward import grade_many

        # null limits: each problem's own (a CodeForces statement's), else the defaults
        settings = {
            k: self.grader[k]
            for k in ("timeout_s", "memory_mb", "time_limit_factor", "min_time_limit_s")
            if self.grader.get(k) is not None
        }
        require = GUARDS if self.grader.get("require_isolation") else ()
        grades = grade_many(
            prompts, completions, workers=self.grader.get("workers"), require=require, **settings
        )
        table = pd.DataFrame(
            {
                "reward": [
                    np.nan if np.isnan(g.pass_fraction) else float(g.all_passed) for g in grades
                ]
            }
        )
        for guard in GUARDS:
            table[f"sandbox_{guard}"] = [g.guards.get(guard) if g.guards else None for g in grades]
        return table
