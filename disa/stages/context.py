"""What every stage of one job reads and where it records what it built."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from disa.cache import Artifact, Cache, CacheError
from disa.executors import LocalExecutor
from disa.models import Backbone
from disa.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Context:
    """The run's settings and config groups, the cache, the task and the backbone, the run
    directory, and the record of what the stages built (timings, reuse, artifacts).

    ``leader`` is False in a process of rank > 0 of a multi-process training launch (see
    :func:`disa.job.launch_rank`): such a process takes part in the collective builds only
    (the training) and never finalises an artifact, logs or writes into the run directory.
    ``executor`` (:mod:`disa.executors`) runs the workers of the sharded stages (:meth:`fill`).
    """

    settings: Settings
    cfg: Any  #: the validated config: the groups a stage builds its components from
    cache: Cache
    task: Any
    backbone: Backbone
    run_dir: Path
    device: torch.device
    loggers: list = field(default_factory=list)
    leader: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    #: every artifact the stages built or reused, by label ("sample.ref", "score", "anchor", ...)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    executor: Any = field(default_factory=LocalExecutor)

    def may_build(self, stages: Iterable[str]) -> bool:
        """Whether this job builds (not only reuses) artifacts of the given stages."""
        return self.settings.stage == "all" or self.settings.stage in tuple(stages)

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def build(
        self,
        stage: str,
        spec: dict,
        builder: Callable[[Artifact], dict | None],
        *,
        built_with: Iterable[str] | None = None,
        label: str | None = None,
        collective: bool = False,
    ) -> Artifact:
        """The cached artifact of ``stage`` for ``spec``, built by ``builder`` if missing.

        It is built only when this job runs one of ``built_with`` (default: ``stage``);
        otherwise a missing artifact is an error naming the stage to run first. A
        ``collective`` build is one every rank of a multi-process launch runs together (the
        training): the leader holds the artifact's lock and finalises it, the other ranks
        take part in ``builder`` without the lock and leave the artifact as it is.
        """
        art = self.cache.artifact(stage, spec)
        if collective and not self.leader:
            if not art.is_complete():
                builder(art)
            return art
        if not art.is_complete() and not self.may_build(built_with or (stage,)):
            raise CacheError(
                f"stage={self.settings.stage} needs the {stage!r} artifact {art.key}, which is not in "
                f"cache_dir={self.cache.root}; run stage={stage} (or stage=all) first"
            )
        with self.timed(stage):
            art, reused = self.cache.build(stage, spec, builder)
        self.reused[stage] = reused and self.reused.get(stage, True)
        self.artifacts[label or stage] = art
        return art

    def fill(
        self, art: Artifact, fill: Callable[..., int], units: list[tuple[str, int]], *args: Any
    ) -> None:
        """Have the executor's workers write the shards ``units`` of ``art``, each worker
        running ``fill(ctx, art, *args)`` (a module-level function that calls
        :meth:`Artifact.fill_shards`); then check that every shard exists.

        A worker that failed is reported; its shards were redone by the others, or are named
        in the :class:`CacheError` raised when some are missing (a rerun resumes them).
        """
        if isinstance(self.executor, LocalExecutor):
            fill(self, art, *args)
        elif art.missing_shards(units):  # none missing (killed while sealing): no workers to start
            outcomes = self.executor.run(
                fill_in_worker, (fill, self.for_workers(), art, args, self.executor.cpus_per_worker)
            )
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            done = [o for o in outcomes if not isinstance(o, BaseException)]
            log.info(
                "%s: %d worker(s) of executor=%s wrote %d shard(s)",
                art,
                len(done),
                self.executor.name,
                sum(o["shards"] for o in done),
            )
            missing = art.missing_shards(units)
            if missing:
                raise CacheError(
                    f"{art}: {len(missing)} shard(s) missing after the workers of executor={self.executor.name} "
                    f"finished ({missing[:5]}); worker errors: {[repr(e) for e in failed][:3]}. Run again to "
                    "resume from the shards written"
                )
            for e in failed:
                log.warning(
                    "%s: a worker of executor=%s failed (%r); the others wrote its shards",
                    art,
                    self.executor.name,
                    e,
                )
        missing = art.missing_shards(units)
        if missing:  # a fill function that skipped some: a bug, never sealed over
            raise CacheError(f"{art}: shard(s) {missing[:5]} missing after the fill")

    def for_workers(self) -> Context:
        """This context without what stays in the job's process (loggers, records, the
        executor), to be pickled to the workers of an executor."""
        return dataclasses.replace(
            self,
            loggers=[],
            leader=False,
            timings={},
            reused={},
            artifacts={},
            executor=LocalExecutor(),
        )

    # -- models and prompts ---------------------------------------------------------------------
    def model_path(self, component: str) -> str:
        """The directory of a mixture component's model: π_ref ("ref") or the proposal."""
        return self.backbone.ref_path if component == "ref" else self.backbone.proposal_path

    def fingerprint(self, component: str) -> str:
        return (
            self.backbone.ref_fingerprint
            if component == "ref"
            else self.backbone.proposal_fingerprint
        )

    def load_model(self, component_or_path: str):
        """A component's model ("ref", "proposal") or the model in a directory, in eval mode."""
        path = (
            self.model_path(component_or_path)
            if component_or_path in ("ref", "proposal")
            else component_or_path
        )
        return self.backbone.load(path, self.device).eval()

    def grade(self, prompts: pd.DataFrame, completions: list[str]) -> pd.DataFrame:
        """The task's grades of ``completions`` (:func:`disa.tasks.grade`: ``reward``, NaN
        for a grading failure, plus the task's own columns), checked to be numbers."""
        from disa.tasks import grade

        return grade(self.task, prompts, completions)

    def rewards(self) -> Rewards:
        """The checked rewards as a function the training loop can hold (and pickle, for
        ``ddp_spawn``): ``(prompt rows, texts) -> float array``."""
        return Rewards(self.task)

    def prompt_rows(self, prompt_ids: pd.Series) -> pd.DataFrame:
        """The task's prompt rows (any split), one per id in ``prompt_ids``: what a reward reads."""
        return self.prompts_all().set_index("prompt_id").loc[prompt_ids.to_numpy()].reset_index()

    def prompts_all(self) -> pd.DataFrame:
        """The task's prompts of both splits."""
        return pd.concat([self.task.prompts("train"), self.task.prompts("test")], ignore_index=True)


class Rewards:
    """``(prompt rows, texts) -> float64 array`` of a task's rewards, checked by
    :func:`disa.tasks.grade`; a class, not a closure, so that it pickles."""

    def __init__(self, task):
        self.task = task

    def __call__(self, prompts: pd.DataFrame, completions: list[str]):
        from disa.tasks import grade

        return grade(self.task, prompts, completions)["reward"].to_numpy()


def fill_in_worker(
    fill: Callable[..., int],
    ctx: Context,
    art: Artifact,
    args: tuple,
    threads: int | None,
    worker: int,
) -> dict[str, Any]:
    """What one worker of an executor runs: ``fill(ctx, art, *args)`` on this machine's device
    (``device=auto`` is resolved where the worker runs) with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    ctx = dataclasses.replace(ctx, device=resolve_device(str(ctx.cfg.device)))
    t0 = time.perf_counter()
    built = fill(ctx, art, *args)
    return {
        "worker": worker,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "shards": built,
        "seconds": time.perf_counter() - t0,
    }


def resolve_device(name: str) -> torch.device:
    """``device=auto`` is the GPU where there is one, else the CPU; any other value as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shards(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def report_nothing(ctx: Context, output: Any) -> dict[str, Any]:
    return {}
