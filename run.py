"""Entry point: ``python run.py [group=option ...] [key=value ...]``, or ``-m`` for sweeps.

Reads like the data flow: compose the config (Hydra) → validate it → run the stages
sample → score → anchor → train → evaluate, each cached → write summary.json. Returns the
trained policy's Mean@k so that Hydra sweepers can optimise it.
"""

from __future__ import annotations

import os
import sys
import uuid

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# A short per-process id in run directory names: jobs launched in the same second never collide.
OmegaConf.register_new_resolver(
    "disa_uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True
)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from disa.job import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = run(cfg, HydraConfig.get().runtime.output_dir)
    return summary.get("policy.mean_at_k")


if __name__ == "__main__":
    from disa.config import upgrade_overrides

    # settings renamed this release keep working, with a warning
    sys.argv[1:] = upgrade_overrides(sys.argv[1:])
    main()
