"""Exact quantities on tasks whose rewarded set is enumerable (the sumpairs task).

Teacher forcing over every rewarded completion gives ``log π(o|q)`` for each of them, hence
the exact ``P_π(correct|q)``, the exact ``log Z`` (for π_ref) and exact distances between a
policy and the target ``p*`` (see :mod:`disa.evaluation`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from disa.scoring import sequence_logprobs
from disa.tokenization import encode_prompt


def rewarded_logprobs(
    model,
    tokenizer,
    task,
    prompts: pd.DataFrame,
    batch_size: int = 512,
    progress: str | None = None,
) -> pd.DataFrame:
    """``log π(o|q)`` of every rewarded completion (text + EOS) of every prompt.

    Returns columns ``prompt_id, answer, logp``.
    """
    rows, p_ids, c_ids = [], [], []
    eos = tokenizer.eos_token_id
    for _, prompt in prompts.iterrows():
        p = encode_prompt(tokenizer, prompt.prompt)
        for ans in task.rewarded_set(prompt):
            rows.append((prompt.prompt_id, ans))
            p_ids.append(p)
            c_ids.append(tokenizer(ans, add_special_tokens=False).input_ids + [eos])
    lp = sequence_logprobs(
        model, p_ids, c_ids, tokenizer.pad_token_id, batch_size=batch_size, progress=progress
    )
    out = pd.DataFrame(rows, columns=["prompt_id", "answer"])
    out["logp"] = lp.numpy()
    return out


def log_p_correct(rewarded: pd.DataFrame) -> pd.Series:
    """``log P_π(correct|q)`` per prompt id, by log-sum-exp over the rewarded set."""

    def lse(x: pd.Series) -> float:
        m = x.max()
        return float(m + np.log(np.exp(x - m).sum()))

    return rewarded.groupby("prompt_id", sort=False).logp.agg(lse)
