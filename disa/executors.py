"""Who runs the workers that fill a sharded artifact: this process, Ray tasks, or the tasks
of a SLURM job array (through submitit). Chosen with ``executor=local|ray|slurm``.

The harness does not schedule anything itself. An executor starts ``workers`` copies of
one function on an existing engine and collects what each returned (or the exception that
ended it); the function pulls its work from the artifact's shard claims
(:meth:`disa.cache.Artifact.fill_shards`), so the cache on a shared filesystem is the work
queue. That keeps every engine interchangeable and makes a dead worker harmless: its claim
is released by the kernel and a live worker redoes the shard.

- **local**: the job's own process is the only worker (the default; what a laptop runs).
- **ray**: one Ray *task* per worker, each reserving ``cpus_per_worker`` CPUs and
  ``gpus_per_worker`` GPUs, so every task holds its own engine (HF or vLLM) for the whole
  stage. A local Ray is started on this machine unless ``address`` names a cluster. Ray
  re-runs a task whose process died (``max_retries``). Ray Data's LLM batch API was not used:
  it returns the engine's own tokens and log-probs, while the harness scores every sequence
  with its one log-prob function and needs each shard's bytes fixed by its seed.
- **slurm**: one SLURM job array (``submitit``), one array task per worker, sized like the
  Hydra submitit launcher (partition, GPUs, CPUs, memory, time). ``cluster=local`` runs the
  array tasks as processes on this machine, which is how the tests exercise it.

The functions an executor runs are pickled (cloudpickle) by reference, so every worker must
import the same ``disa`` (an installed package) and see the same ``cache_dir``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray", "slurm")
#: what each executor needs installed, and the extra that installs it
EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "sweeps")}


class ExecutorMissing(ImportError):
    """The engine an ``executor`` setting names is not installed."""


def _need(name: str) -> None:
    module, extra = EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise ExecutorMissing(
            f"executor={name} needs the '{extra}' extra: pip install 'disa[{extra}]'"
        )


@dataclass
class LocalExecutor:
    """The job's own process is the one worker; an exception propagates as it is."""

    name: str = "local"
    workers: int = 1
    cpus_per_worker: int | None = None  # the process's own torch threads are left as they are

    def run(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        return [fn(*args, 0)]

    def close(self) -> None:
        pass


@dataclass
class RayExecutor:
    """``workers`` Ray tasks, on a local Ray (started here) or the cluster at ``address``."""

    workers: int
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    address: str | None = None
    max_retries: int = 1
    name: str = "ray"
    _started: bool = False

    def _start(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, include_dashboard=False)
        else:  # room for every worker at once, whatever this machine's core count
            ray.init(num_cpus=self.workers * self.cpus_per_worker, include_dashboard=False)
            self._started = True

    def run(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        import ray

        self._start()
        task = ray.remote(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_retries=self.max_retries,
        )(fn)
        refs = [task.remote(*args, w) for w in range(self.workers)]
        try:
            out = []
            for ref in refs:
                try:
                    out.append(ray.get(ref))
                except Exception as e:
                    out.append(e)  # a worker that failed for good; its shards are checked after
            return out
        except BaseException:  # interrupted: stop the workers (their claims are released)
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        """Shut down the Ray this executor started (a cluster it joined keeps running)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


@dataclass
class SlurmExecutor:
    """One SLURM job array of ``workers`` tasks per round, through submitit."""

    workers: int
    folder: str
    cluster: str = "slurm"
    cpus_per_worker: int = 1
    #: submitit parameters (timeout_min, slurm_partition, gpus_per_node, ...)
    parameters: dict | None = None
    name: str = "slurm"

    def run(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        import submitit

        ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        ex.update_parameters(**{"cpus_per_task": self.cpus_per_worker, **(self.parameters or {})})
        jobs = ex.map_array(fn, *([a] * self.workers for a in args), list(range(self.workers)))
        log.info(
            "submitted %d array task(s) (%s), logs in %s",
            len(jobs),
            jobs[0].job_id if jobs else "-",
            self.folder,
        )
        try:
            out = []
            for job in jobs:
                try:
                    out.append(job.result())
                except Exception as e:
                    out.append(e)  # a task that failed or was killed; its shards are checked after
            return out
        except BaseException:
            for job in jobs:
                job.cancel(check=False)
            raise

    def close(self) -> None:
        pass


#: settings of conf/executor/slurm.yaml passed to submitit, and submitit's name for each
_SLURM_PARAMETERS = {
    "timeout_min": "timeout_min",
    "mem_gb": "mem_gb",
    "gpus_per_node": "gpus_per_node",
    "partition": "slurm_partition",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "array_parallelism": "slurm_array_parallelism",
    "setup": "slurm_setup",
    "additional_parameters": "slurm_additional_parameters",
}


def build_executor(cfg) -> LocalExecutor | RayExecutor | SlurmExecutor:
    """The executor ``cfg`` (the ``executor`` group; None: local) describes."""
    name = "local" if cfg is None else str(cfg.name)
    if name == "local":
        return LocalExecutor()
    _need(name)
    if name == "ray":
        return RayExecutor(
            workers=int(cfg.workers),
            cpus_per_worker=int(cfg.cpus_per_worker),
            gpus_per_worker=float(cfg.gpus_per_worker),
            address=cfg.get("address"),
            max_retries=int(cfg.max_retries),
        )
    params = {
        submitit_name: cfg[key]
        for key, submitit_name in _SLURM_PARAMETERS.items()
        if cfg.get(key) is not None
    }
    for key in ("setup", "additional_parameters"):  # plain containers for submitit's pickles
        name_ = _SLURM_PARAMETERS[key]
        if name_ in params:
            params[name_] = _plain(params[name_])
    return SlurmExecutor(
        workers=int(cfg.workers),
        folder=str(Path(cfg.folder)),
        cluster=str(cfg.cluster),
        cpus_per_worker=int(cfg.cpus_per_worker),
        parameters=params,
    )


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def problems(cfg) -> list[str]:
    """What is wrong with the ``executor`` group, each naming the setting and what is allowed."""
    if cfg is None:
        return []
    name = cfg.get("name")
    if name not in EXECUTORS:
        return [f"executor.name={name!r} is invalid; allowed: one of {list(EXECUTORS)}"]
    errors = []
    if name != "local":
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            errors.append(
                f"executor={name} is not installed: it needs the '{extra}' extra: "
                f"pip install 'disa[{extra}]' (or use executor=local)"
            )
        checks = [
            ("workers", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("cpus_per_worker", lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ]
        if name == "ray":
            checks += [
                ("gpus_per_worker", lambda v: _real(v) and v >= 0, "a number >= 0"),
                ("max_retries", lambda v: _int(v) and v >= 0, "an integer >= 0"),
            ]
        else:
            checks += [
                ("cluster", lambda v: v in ("slurm", "local"), "one of ['slurm', 'local']"),
                ("folder", lambda v: isinstance(v, str) and v != "", "a directory path"),
                ("timeout_min", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ]
        for key, ok, allowed in checks:
            v = cfg.get(key, "<missing>")
            if v == "<missing>" or not ok(v):
                errors.append(f"executor.{key}={v!r} is invalid; allowed: {allowed}")
    return errors


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return (
        isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    )
