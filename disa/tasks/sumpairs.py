"""The sumpairs task: write two numbers that add up to ``n``.

Prompt ``"37="``; a completion is rewarded iff it reads ``"a+b"`` with ``a``, ``b``
non-negative decimal integers without leading zeros and ``a + b = n``. Every prompt has
``n + 1`` distinct correct answers, so diversity and mode collapse are visible, and the
rewarded set is small enough to enumerate: teacher forcing over it gives the exact
``P_ref(correct | q)`` and hence the exact ``log Z`` (see :mod:`disa.anchor`).

It also brings what the embedded backbone is pre-trained with (:mod:`disa.models`): the
characters its tokenizer needs (:attr:`SumPairsTask.alphabet`) and a corpus of
(prompt, completion) pairs (:meth:`SumPairsTask.corpus`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

_ANSWER = re.compile(r"(0|[1-9][0-9]*)\+(0|[1-9][0-9]*)")


def _prompt(n: int) -> str:
    return f"{n}="


@dataclass(frozen=True)
class SumPairsTask:
    min_sum: int = 0
    max_sum: int = 59
    test_fraction: float = 0.25
    split_seed: int = 0
    name: str = "sumpairs"
    version: int = 1  # bump when the reward or prompt format changes: invalidates caches
    #: every character of a prompt or a completion (the char tokenizer's vocabulary)
    alphabet: ClassVar[str] = "0123456789+="

    def spec(self) -> dict:
        return asdict(self)

    # -- prompts ---------------------------------------------------------------------------
    def _all(self) -> pd.DataFrame:
        n = np.arange(self.min_sum, self.max_sum + 1)
        rng = np.random.default_rng(self.split_seed)
        n_test = max(1, round(self.test_fraction * len(n)))
        test = set(rng.choice(n, size=n_test, replace=False).tolist())
        return pd.DataFrame(
            {
                "prompt_id": [f"sum-{k}" for k in n],
                "prompt": [_prompt(k) for k in n],
                "target": n,
                "split": ["test" if k in test else "train" for k in n],
            }
        )

    def prompts(self, split: str) -> pd.DataFrame:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}; allowed: ['train', 'test']")
        df = self._all()
        return df[df.split == split].drop(columns="split").reset_index(drop=True)

    # -- rewards ---------------------------------------------------------------------------
    @staticmethod
    def is_correct(target: int, completion: str) -> bool:
        m = _ANSWER.fullmatch(completion)
        return bool(m) and int(m.group(1)) + int(m.group(2)) == target

    def rewards(self, prompts: pd.DataFrame, completions: list[str]) -> np.ndarray:
        return np.array(
            [float(self.is_correct(int(t), c)) for t, c in zip(prompts.target, completions)],
            dtype=np.float64,
        )

    def rewarded_set(self, prompt: pd.Series) -> list[str]:
        """Every rewarded completion of ``prompt`` (the exact oracle enumerates these)."""
        n = int(prompt.target)
        return [f"{a}+{n - a}" for a in range(n + 1)]

    # -- pre-training corpus for the embedded backbone -------------------------------------
    def corpus(
        self, rng: np.random.Generator, size: int, p_correct: float
    ) -> list[tuple[str, str]]:
        """``size`` pairs ``("n=", "a+b")`` in the prompt format of :meth:`prompts`: correct
        with probability ``p_correct``, else ``b`` drawn at random (plausible-looking
        mistakes). Covers every ``n`` in range, test prompts included: this is the reference
        model's knowledge, not RL training data."""
        n = rng.integers(self.min_sum, self.max_sum + 1, size)
        a = (rng.random(size) * (n + 1)).astype(int)
        wrong_b = rng.integers(0, self.max_sum + 1, size)
        b = np.where(rng.random(size) < p_correct, n - a, wrong_b)
        return [(_prompt(x), f"{y}+{z}") for x, y, z in zip(n, a, b)]
