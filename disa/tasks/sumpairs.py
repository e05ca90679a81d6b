"""The sumpairs task: write two numbers that add up to ``n``.

Two prompt formats (``template``), one reward rule:

- ``compact`` (the embedded backbone's): prompt ``"37="``, completion ``"a+b"``.
- ``fewshot`` (a pretrained LM's): a few worked lines ``"12 = 5 + 7\n…"`` then ``"37 ="``;
  completion ``" a + b"``, ended by the backbone's stop token (``backbone.eos_token: "\n"``
  for SmolLM2, so that the completion is one line).

A completion is rewarded iff it reads exactly ``a+b`` (in the template's spacing) with ``a``,
``b`` non-negative decimal integers without leading zeros and ``a + b = n``. Every prompt has
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

_NUMBER = r"(0|[1-9][0-9]*)"

#: the worked examples ``(n, a)`` in front of a ``fewshot`` prompt: sums of both parities, a
#: zero term. Three lines, measured on SmolLM2-135M-Instruct (exact P(correct), n = 4…22):
#: 2 lines 2.8%, 3 lines 3.7% (about 6 equally likely correct answers per prompt), 4 lines
#: 2.2%, 6 lines 3.2% for a prompt twice as long (compute on a CPU grows with it).
FEWSHOT_EXAMPLES = ((12, 5), (20, 11), (9, 0))

#: template → (prompt of n, answer a+b, pattern of a completion)
TEMPLATES = {
    "compact": (lambda n: f"{n}=", lambda a, b: f"{a}+{b}", re.compile(_NUMBER + r"\+" + _NUMBER)),
    "fewshot": (
        lambda n: "".join(f"{m} = {a} + {m - a}\n" for m, a in FEWSHOT_EXAMPLES) + f"{n} =",
        lambda a, b: f" {a} + {b}",
        re.compile(" " + _NUMBER + r" \+ " + _NUMBER),
    ),
}


@dataclass(frozen=True)
class SumPairsTask:
    min_sum: int = 0
    max_sum: int = 59
    test_fraction: float = 0.25
    split_seed: int = 0
    template: str = "compact"  # a key of TEMPLATES
    name: str = "sumpairs"
    version: int = 1  # bump when the reward or prompt format changes: invalidates caches
    #: every character of a prompt or a completion (the char tokenizer's vocabulary)
    alphabet: ClassVar[str] = "0123456789+="

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(
                f"task.template={self.template!r} is not known; allowed: {sorted(TEMPLATES)}"
            )

    def spec(self) -> dict:
        spec = asdict(self)
        if self.template == "compact":  # the original format keeps its cache keys
            del spec["template"]
        return spec

    def _prompt(self, n: int) -> str:
        return TEMPLATES[self.template][0](n)

    def _answer(self, a: int, b: int) -> str:
        return TEMPLATES[self.template][1](a, b)

    # -- prompts ---------------------------------------------------------------------------
    def _all(self) -> pd.DataFrame:
        n = np.arange(self.min_sum, self.max_sum + 1)
        rng = np.random.default_rng(self.split_seed)
        n_test = max(1, round(self.test_fraction * len(n)))
        test = set(rng.choice(n, size=n_test, replace=False).tolist())
        return pd.DataFrame(
            {
                "prompt_id": [f"sum-{k}" for k in n],
                "prompt": [self._prompt(k) for k in n],
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
    def is_correct(self, target: int, completion: str) -> bool:
        m = TEMPLATES[self.template][2].fullmatch(completion)
        return bool(m) and int(m.group(1)) + int(m.group(2)) == target

    def rewards(self, prompts: pd.DataFrame, completions: list[str]) -> np.ndarray:
        return np.array(
            [float(self.is_correct(int(t), c)) for t, c in zip(prompts.target, completions)],
            dtype=np.float64,
        )

    def rewarded_set(self, prompt: pd.Series) -> list[str]:
        """Every rewarded completion of ``prompt`` (the exact oracle enumerates these)."""
        n = int(prompt.target)
        return [self._answer(a, n - a) for a in range(n + 1)]

    # -- pre-training corpus for the embedded backbone -------------------------------------
    def corpus(
        self, rng: np.random.Generator, size: int, p_correct: float, split: str | None = None
    ) -> list[tuple[str, str]]:
        """``size`` pairs ``("n=", "a+b")`` in the prompt format of :meth:`prompts`: correct
        with probability ``p_correct``, else ``b`` drawn at random (plausible-looking
        mistakes). ``split=None`` covers every ``n`` in range, test prompts included (the
        embedded reference model's knowledge, not RL training data); ``split="train"`` only
        the training prompts' (a proposal fine-tuned on answers must not see held-out ones)."""
        if split is None:
            n = rng.integers(self.min_sum, self.max_sum + 1, size)
        else:
            n = rng.choice(self.prompts(split).target.to_numpy(), size)
        a = (rng.random(size) * (n + 1)).astype(int)
        wrong_b = rng.integers(0, self.max_sum + 1, size)
        b = np.where(rng.random(size) < p_correct, n - a, wrong_b)
        return [(self._prompt(x), self._answer(y, z)) for x, y, z in zip(n, a, b)]
