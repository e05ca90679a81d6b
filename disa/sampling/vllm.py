"""Sampling with vLLM (optional extra: ``pip install 'disa[vllm]'`` on a CUDA machine).

Same interface as :class:`disa.sampling.hf.HFSampler`. vLLM loads weights from a directory,
not from a module in memory, so the engine is built from the ``name_or_path`` of the model
it is given (the directory ``transformers`` loaded it from: π_ref, the proposal, a trained
policy). One engine per path is kept for the sampler's lifetime, so the shards of a stage
reuse it. If the in-memory weights change after the engine loaded them (an online policy),
the next call refuses rather than sample from stale weights.

The processed distribution matches HF ``generate`` and :func:`disa.scoring.process_logits`
(temperature, then top-k, then top-p); the model's own ``generation_config`` defaults
(repetition penalty, min-p, extra stop tokens) are switched off so that nothing else
changes the density that ``log μ`` is scored under. Stopping: at the tokenizer's EOS only,
which ends the returned completion (no EOS when ``max_new_tokens`` was hit), as with HF.

Log-probs for anchoring and training come from :mod:`disa.scoring`. vLLM's own log-probs of
the sampled tokens (summed per completion, ``nan`` where it reported none) are kept in
:attr:`VLLMSampler.last_logprobs` after each call, for :func:`logprob_agreement` against the
scored ones: a large gap means the engine and the scorer disagree about the model (dtype,
kernels, a different checkpoint) and the importance weights should not be trusted. Where
vLLM has ``logprobs_mode`` (0.10.2+) they are those of the *processed* distribution, i.e.
comparable with the scored ``log μ`` (``logq_<component>``); older versions report the raw
model's, comparable with ``log μ`` only for identity settings (``logprobs_kind`` says which).
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from disa.sampling import SamplerSettings
from disa.settings import derive_seed

INSTALL_HINT = "sampler=vllm needs the 'vllm' extra: pip install 'disa[vllm]' on a CUDA machine"


class VLLMMissing(ImportError):
    """vLLM is not installed (or cannot be imported on this machine)."""


def import_vllm():
    """The ``vllm`` module, or :class:`VLLMMissing` with the install hint."""
    try:
        import vllm
    except ImportError as e:  # also a CUDA-less machine where vllm's import fails
        raise VLLMMissing(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    return vllm


def model_path(model) -> str:
    """The directory (or hub id) ``transformers`` loaded ``model`` from."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    path = getattr(inner, "name_or_path", None) or getattr(inner.config, "_name_or_path", "")
    if not path:
        raise ValueError("sampler=vllm needs a model loaded from a directory (from_pretrained); this one has no "
                         "name_or_path: save it with save_pretrained and load it from there")
    return str(path)


def _engine_has(arg: str) -> bool:
    """Whether this vLLM's ``EngineArgs`` has the field ``arg``."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return arg in {f.name for f in dataclasses.fields(EngineArgs)}


def _weights_signature(model) -> tuple[float, ...]:
    """A cheap fingerprint of the in-memory weights (first and last parameter sums)."""
    params = [p for p in model.parameters()]
    return tuple(float(p.detach().double().sum()) for p in (params[0], params[-1]))


class VLLMSampler:
    def __init__(
        self,
        batch_size: int = 1024,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        enforce_eager: bool = False,
    ):
        import_vllm()  # fail at build time, with the hint, not at the first shard
        self.batch_size = batch_size
        self.engine_args = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "max_model_len": None if max_model_len is None else int(max_model_len),
            "seed": int(seed),
            "dtype": dtype,
            "enforce_eager": bool(enforce_eager),
            "generation_config": "vllm",  # ignore the checkpoint's sampling defaults (see module doc)
        }
        #: "processed" (log μ of the sampler settings) or "raw" (the model's own log π)
        self.logprobs_kind = "raw"
        if _engine_has("logprobs_mode"):
            self.engine_args["logprobs_mode"] = "processed_logprobs"
            self.logprobs_kind = "processed"
        self._engine = None
        self._engine_key: tuple[str, tuple[float, ...]] | None = None
        #: vLLM's summed log-probs of the last call's completions, shaped like its result
        self.last_logprobs: list[list[float]] | None = None

    @classmethod
    def from_cfg(cls, cfg) -> VLLMSampler:
        s = cfg.sampler
        return cls(batch_size=int(s.batch_size), tensor_parallel_size=int(s.tensor_parallel_size),
                   gpu_memory_utilization=float(s.gpu_memory_utilization), max_model_len=s.get("max_model_len"),
                   seed=int(s.seed), dtype=str(s.dtype), enforce_eager=bool(s.get("enforce_eager", False)))

    def engine(self, model):
        """The vLLM engine for ``model``'s directory (built once; rebuilt for another path)."""
        path = model_path(model)
        signature = _weights_signature(model)
        if self._engine_key is not None and self._engine_key[0] == path:
            if self._engine_key[1] != signature:
                raise RuntimeError(
                    f"the weights of the model from {path} changed since vLLM loaded that directory; sampler=vllm "
                    "samples from the saved checkpoint only (use sampler=hf for a policy being trained)")
            return self._engine
        self.close()
        if not Path(path).exists() and path.count("/") != 1:
            raise FileNotFoundError(f"sampler=vllm: model path {path!r} does not exist")
        vllm = import_vllm()
        self._engine = vllm.LLM(model=path, tokenizer=path, **self.engine_args)
        self._engine_key = (path, signature)
        return self._engine

    def close(self) -> None:
        """Free the engine's GPU memory (the scorer needs it next)."""
        if self._engine is None:
            return
        self._engine = self._engine_key = None
        with contextlib.suppress(Exception):  # best effort: the API moves between vLLM versions
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
        (no EOS when it hit ``max_new_tokens``). Deterministic given ``seed``: request ``i``
        is seeded with ``(seed, i)``, whatever the batching."""
        vllm = import_vllm()
        llm = self.engine(model)
        eos = tokenizer.eos_token_id
        params = [
            vllm.SamplingParams(
                n=n, temperature=settings.temperature, top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1, max_tokens=settings.max_new_tokens,
                min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                stop_token_ids=[eos], skip_special_tokens=False, logprobs=0,
                seed=derive_seed(seed, "request", i),
            )
            for i in range(len(prompt_ids))
        ]
        per_batch = max(1, self.batch_size // n)
        out: list[list[list[int]]] = []
        logprobs: list[list[float]] = []
        for s in range(0, len(prompt_ids), per_batch):
            prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids[s : s + per_batch]]
            for result in llm.generate(prompts, params[s : s + per_batch], use_tqdm=False):
                group = [_completion(c, eos) for c in result.outputs]
                out.append([ids for ids, _ in group])
                logprobs.append([lp for _, lp in group])
        self.last_logprobs = logprobs
        return out


def _completion(c, eos: int) -> tuple[list[int], float]:
    """Token ids up to and including the first EOS, and vLLM's summed log-prob of them."""
    ids = list(c.token_ids)
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    elif c.finish_reason == "stop":  # stopped on EOS but the engine left the token out
        ids = ids + [eos]
    per_token = c.logprobs or []
    if len(per_token) < len(ids):
        return ids, math.nan
    return ids, float(sum(step[t].logprob for t, step in zip(ids, per_token)))


def logprob_agreement(sampler_logprob, scored_logprob, n_tokens) -> dict[str, float]:
    """How far the sampler's summed log-probs are from the scorer's, per sequence and per token.

    ``sampler_logprob``/``scored_logprob``/``n_tokens``: ``[N]`` arrays (``nan`` sampler values
    are skipped). bf16 engines typically agree to ~1e-2 nats per token; much more means the
    two do not run the same model.
    """
    a = np.asarray(sampler_logprob, dtype=np.float64)
    b = np.asarray(scored_logprob, dtype=np.float64)
    n = np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return {"compared": 0.0, "max_abs_diff": math.nan, "mean_abs_diff_per_token": math.nan}
    d = np.abs(a[ok] - b[ok])
    return {"compared": float(ok.sum()), "max_abs_diff": float(d.max()),
            "mean_abs_diff_per_token": float((d / n[ok]).mean())}
