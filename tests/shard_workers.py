"""Worker functions for tests/test_parallel.py, importable by the workers of an executor
(Ray tasks, submitit array tasks, forked processes): they find this directory on
``PYTHONPATH``, which the tests set before starting them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from disa.cache import Cache

N_SHARDS = 6


def toy_shard(i: int) -> pd.DataFrame:
    """Shard ``i`` of the toy artifact: a pure function of ``i``, as a seeded stage's is."""
    return pd.DataFrame(
        {"i": [i] * 3, "v": [10 * i, 10 * i + 1, 10 * i + 2], "s": [f"s{i}-{j}" for j in range(3)]}
    )


def units() -> list[tuple[str, int]]:
    return [("part", i) for i in range(N_SHARDS)]


def toy_fill(root: str, spec: dict, hang_on: int | None, marker: str | None, worker: int) -> dict:
    """Fill the toy artifact's shards. The first worker to claim shard ``hang_on`` writes its
    pid to ``marker`` and hangs there (until the test kills it); the others build normally,
    a little slowly, so that every worker gets some shards."""
    art = Cache(root).artifact("toy", spec)

    def make(prefix: str, i: int) -> pd.DataFrame:
        if i == hang_on and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(600)
        time.sleep(0.05)
        return toy_shard(i)

    return {
        "worker": worker,
        "pid": os.getpid(),
        "shards": art.fill_shards(units(), make, poll_s=0.1),
    }
