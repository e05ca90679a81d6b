"""What a DISA training step costs, against a supervised step, the naive log-prob path and
one online update of FlowRL and GRPO, measured on the same tokens in one run.

    python experiments/benchmark.py                                     # CPU: embedded backbone
    python experiments/benchmark.py --preset qwen-tiny --seq-lens 128,512 --tokens-per-step 2048
                                                                        # CPU: Qwen2.5's vocabulary
    python experiments/benchmark.py --device cuda --preset qwen0.5b --seq-lens 1024,2048,4096
    python experiments/benchmark.py --quick --out /tmp/b.json           # seconds (tests)
    python experiments/benchmark.py --device cuda --impls liger,cce     # + the fused backends

Prints a table per section and writes everything to ``--out`` (JSON). Sections:

- ``steps``: one optimizer step on ``batch`` sequences of ``prompt_len + T`` tokens with
  ``disa`` (policy forward+backward through :func:`disa.scoring.token_logprobs`, the
  registered DISA loss, AdamW), ``sft_chunked`` (the same path with NLL: "what a supervised
  step costs" with the same machinery), ``sft_hf`` (transformers' own ``labels=`` loss on
  full logits, the usual SFT step) and ``naive`` (DISA on full logits → ``log_softmax`` →
  gather, as most RL code computes log-probs), and ``disa_liger`` / ``disa_cce``: the DISA step
  through a fused log-prob backend (``scoring.logprob_impl``; GPU, where its extra is installed);
- ``scoring``: no-grad ``token_logprobs`` against the naive no-grad path (the score stage) and
  the fused backends;
- ``memory``: peak memory of the log-prob computation at the real Qwen vocabulary (151,936)
  on a tiny Qwen2-shaped model (CPU) or on the preset model (GPU), chunked and fused against naive;
- ``online``: one FlowRL and one GRPO update built from
  :class:`disa.training.online.OnlinePolicyModule` (HF ``generate`` of ``group_size``
  completions per prompt, old-policy and, where the algorithm needs it, reference passes,
  one policy step) against one DISA step on the same number of trajectories and tokens;
- ``generation``: HF ``generate`` against vLLM (only where vLLM and a GPU exist).

Figures: tokens/s (every position of every sequence), model FLOPs utilisation
``MFU = k·N·tokens / seconds / peak`` with ``k = 6`` for forward+backward and ``2`` for a
forward, ``N`` the parameters that do matrix work (the input embedding table counts only
where it is tied to the output projection), attention-score FLOPs not counted (so MFU is a
slight underestimate at long sequences); the peak is the dense bf16 tensor-core rate of the
GPU (H100/H200: 989 TFLOP/s) or, on CPU, a measured float32 matmul rate (reported, but MFU
of a 100k-parameter model on a CPU says little). Peak memory: ``torch.cuda.max_memory_allocated``
above what was allocated before the measured call (weights and optimizer state excluded),
on CPU the same quantity tracked per tensor by ``torch.distributed._tools.MemTracker``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from disa.losses import get_loss  # noqa: E402
from disa.scoring import Batch, logprob_impl_problem, pack, token_logprobs  # noqa: E402

QWEN_VOCAB = 151_936
#: dense bf16 tensor-core peak (FLOP/s) by device-name substring; the first match wins
GPU_PEAKS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("4090", 165e12),
]
TARGETS = {
    "disa_mfu": ("DISA step MFU on GPU", ">= 0.45"),
    "disa_vs_sft": ("DISA / SFT (chunked) tokens/s on GPU", ">= 0.95"),
    "disa_vs_sft_hf": ("DISA / SFT (transformers labels=) tokens/s on GPU", ">= 0.95"),
    "logprob_memory_ratio": (
        "log-prob peak memory, chunked / naive (vocab 151,936; batch >= 4 chunks)",
        "<= 0.25",
    ),
    "scoring_mfu": ("scoring (no-grad token_logprobs) MFU on GPU", ">= 0.50"),
    "flowrl_over_disa": (
        "one FlowRL online update / one DISA update (same trajectories)",
        "reported",
    ),
    "disa_fused_vs_chunked": (
        "DISA step tokens/s, fastest fused backend / chunked (GPU)",
        "reported",
    ),
}


# -- models and data ---------------------------------------------------------------------------
def qwen_config(vocab_size: int = QWEN_VOCAB, **shape):
    """Qwen2.5-0.5B's shape by default; ``shape`` overrides fields (tiny models for tests)."""
    from transformers import Qwen2Config

    base = dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    return Qwen2Config(
        vocab_size=vocab_size, **(base | shape), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )


def embedded_model(max_len: int):
    """The embedded backbone's architecture (conf/backbone/embedded.yaml), random weights."""
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from disa.models import embedded_config
    from disa.tasks.sumpairs import SumPairsTask
    from disa.tokenization import build_char_tokenizer

    b = OmegaConf.load(REPO / "conf" / "backbone" / "embedded.yaml")
    b.max_length = max(int(b.max_length), max_len)
    return LlamaForCausalLM(embedded_config(len(build_char_tokenizer(SumPairsTask.alphabet)), b))


def build_model(preset: str, max_len: int, quick: bool = False):
    if preset == "embedded":
        return embedded_model(max_len)
    from transformers import Qwen2ForCausalLM

    # qwen-tiny: Qwen2.5's vocabulary on a 2-layer, 64-wide body, so that on a CPU the
    # vocabulary projection dominates a step as it does for the real model on a GPU
    tiny = quick or preset == "qwen-tiny"
    shape = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        if tiny
        else {}
    )
    return Qwen2ForCausalLM(
        qwen_config(
            4096 if quick else QWEN_VOCAB, max_position_embeddings=max(max_len, 64), **shape
        )
    )


def matmul_params(model) -> int:
    """Parameters doing matrix work per token: all of them, less an untied input embedding."""
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return n if head is not None and head.weight is emb.weight else n - emb.weight.numel()


def random_batch(B: int, P: int, T: int, vocab: int, device, seed: int = 0) -> tuple[Batch, dict]:
    """``B`` sequences of ``P`` prompt and ``T`` completion tokens (ids ≥ 3, so none is
    pad/bos/eos), with the per-trajectory cache columns a DISA step reads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P + T), generator=g)
    batch = pack(ids[:, :P].tolist(), ids[:, P:].tolist(), pad_id=0).to(device)
    cache = {
        "log_z_hat": torch.rand(B, generator=g),
        "logp_ref_seq": -T * 5 * torch.rand(B, generator=g),
        "reward": (torch.rand(B, generator=g) < 0.3).float(),
    }
    return batch, {k: v.to(device) for k, v in cache.items()}


# -- measuring ---------------------------------------------------------------------------------
def measure(
    fn: Callable[[], Any],
    device: torch.device,
    args,
    *,
    tokens: int,
    flops_per_token: float,
    peak: float,
    warm_call: bool = False,
) -> dict[str, Any]:
    """Peak memory, median time, tokens/s and MFU of ``fn`` (which processes ``tokens``
    tokens), or ``{"oom": True}`` where it ran out of GPU memory."""
    try:
        if warm_call:
            fn()
        mem = peak_memory(fn, device)
        sec = timed(fn, device, args.warmup, args.reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    return {
        "seconds": sec,
        "tokens_per_s": tokens / sec,
        "mfu": flops_per_token * tokens / sec / peak,
        "peak_mem_mib": mem / 2**20,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    return int(sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))


def cpu_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """float32 matmul FLOP/s of this CPU (best of ``reps``), the MFU denominator on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_flops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAKS:
            if key in name:
                return flops, f"{name}: dense bf16 tensor-core peak {flops / 1e12:.0f} TFLOP/s"
        return math.nan, f"{name}: unknown peak (pass --peak-tflops)"
    flops = cpu_matmul_peak()
    return (
        flops,
        f"measured float32 matmul on {os.cpu_count()} CPU cores ({torch.get_num_threads()} threads)",
    )


# -- the steps ---------------------------------------------------------------------------------
def _naive_logprobs(model, batch: Batch) -> torch.Tensor:
    """Full ``[B, P+T, V]`` logits → float32 ``log_softmax`` → gather: ``[B, T]``."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    P = batch.prompt_len
    lp = logits[:, P - 1 : -1].float().log_softmax(-1)
    return lp.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1) * batch.completion_mask


def _sft_labels(batch: Batch) -> torch.Tensor:
    labels = batch.input_ids.clone()
    labels[:, : batch.prompt_len] = -100
    labels[batch.attention_mask == 0] = -100
    return labels


def step_fns(
    model, opt, batch: Batch, cache: dict, chunk: int, amp, fused: tuple[str, ...] = ()
) -> dict[str, Callable[[], None]]:
    """One optimizer step of each method, on the same batch (``fused``: the fused log-prob
    backends to time, as ``disa_<backend>``)."""
    disa = get_loss("disa")
    mask = batch.completion_mask

    def finish(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def disa_step(impl: str = "chunked"):
        with amp():
            loss, _ = disa(
                token_logprobs(model, batch, chunk_size=chunk, impl=impl),
                mask,
                cache,
                disa.make_options({}, beta=2.0),
            )
        finish(loss)

    def sft_chunked():
        with amp():
            lp = token_logprobs(model, batch, chunk_size=chunk)
            loss = -(lp * mask).sum() / mask.sum()
        finish(loss)

    def sft_hf():
        with amp():
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=_sft_labels(batch),
                use_cache=False,
            ).loss
        finish(loss)

    def naive():
        with amp():
            loss, _ = disa(
                _naive_logprobs(model, batch), mask, cache, disa.make_options({}, beta=2.0)
            )
        finish(loss)

    return {
        "disa": disa_step,
        "sft_chunked": sft_chunked,
        "sft_hf": sft_hf,
        "naive": naive,
        **{f"disa_{impl}": partial(disa_step, impl) for impl in fused},
    }


def score_fns(
    model, batch: Batch, chunk: int, fused: tuple[str, ...] = ()
) -> dict[str, Callable[[], None]]:
    @torch.no_grad()
    def scored(impl: str = "chunked"):
        token_logprobs(model, batch, chunk_size=chunk, impl=impl)

    @torch.no_grad()
    def naive():
        _naive_logprobs(model, batch)

    return {"chunked": scored, "naive": naive, **{impl: partial(scored, impl) for impl in fused}}


def fused_backends(args, device: torch.device) -> tuple[tuple[str, ...], dict[str, str]]:
    """The fused backends of ``--impls`` that run here, and why each other one does not."""
    half = args.precision == "bf16-mixed"
    problems = {
        impl: logprob_impl_problem(impl, on_cuda=device.type == "cuda", half_precision=half)
        for impl in args.impls
    }
    return tuple(i for i, p in problems.items() if p is None), {
        i: p for i, p in problems.items() if p
    }


# -- online updates ------------------------------------------------------------------------------
class _IdTokenizer:
    """Just enough of a tokenizer for :class:`OnlinePolicyModule` on random token ids."""

    def __init__(self, prompts: dict[str, list[int]], pad: int = 0, eos: int = 2):
        self.prompts, self.pad_token_id, self.eos_token_id = prompts, pad, eos

    def __call__(self, text: str):
        return type("Enc", (), {"input_ids": self.prompts[text]})()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


class _FixedLengthSampler:
    """HF ``generate`` of exactly ``T`` new tokens (a random model rarely stops by itself, and
    a fixed length makes the online update process as many tokens as the DISA step)."""

    def __init__(self, T: int, amp):
        self.T, self.amp, self.seconds = T, amp, 0.0

    @torch.no_grad()
    def sample(self, model, tokenizer, prompt_ids, n, settings, seed):
        device = next(model.parameters()).device
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        ids = torch.tensor(prompt_ids, device=device)
        with self.amp():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                num_return_sequences=n,
                min_new_tokens=self.T,
                max_new_tokens=self.T,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        sync(device)
        self.seconds += time.perf_counter() - t0
        new = out[:, ids.shape[1] :].tolist()
        return [new[i * n : (i + 1) * n] for i in range(len(prompt_ids))]


def online_update(
    algorithm: str, model_factory, B: int, P: int, T: int, group: int, device, amp, seed: int = 0
) -> dict[str, float]:
    """Seconds of one rollout + one update of ``algorithm`` (flowrl | grpo) on ``B`` trajectories."""
    import pandas as pd
    from omegaconf import OmegaConf

    from disa.sampling import SamplerSettings
    from disa.training.online import LogZHead, OnlinePolicyModule

    alg = OmegaConf.load(REPO / "conf" / "algorithm" / f"{algorithm}.yaml")
    loss = get_loss(alg.loss)
    options = loss.make_options(OmegaConf.to_container(alg.loss_args, resolve=True), beta=2.0)
    policy = model_factory().to(device).train()
    ref = model_factory().to(device).eval() if loss.reads_reference(options) else None
    n_prompts = B // group
    g = torch.Generator().manual_seed(seed)
    prompt_ids = {
        f"p{i}": torch.randint(3, policy.config.vocab_size, (P,), generator=g).tolist()
        for i in range(n_prompts)
    }
    frame = pd.DataFrame({"prompt_id": list(prompt_ids), "prompt": list(prompt_ids)})
    task = type(
        "RandomReward",
        (),
        {
            "rewards": lambda self, rows, texts: (
                (torch.rand(len(texts), generator=g) < 0.3).float().tolist()
            )
        },
    )()
    needs_head = "log_z" in loss.needs(options)
    head = (
        LogZHead(policy.config.hidden_size, int(alg.log_z_head.num_layers), 0.0)
        if needs_head
        else None
    )
    sampler = _FixedLengthSampler(T, amp)
    module = OnlinePolicyModule(
        policy,
        ref,
        _IdTokenizer(prompt_ids),
        task,
        frame,
        sampler,
        SamplerSettings(max_new_tokens=T),
        loss,
        options,
        lambda p: torch.optim.AdamW(p, lr=1e-6),
        group_size=group,
        updates_per_rollout=1,
        minibatch_size=B,
        scale_rewards=str(alg.get("scale_rewards", "group")),
        log_z_head=head,
        seed=seed,
    ).to(device)
    opt = module.configure_optimizers()

    def once() -> tuple[float, float, float]:
        sampler.seconds = 0.0
        sync(device)
        t0 = time.perf_counter()
        with amp():
            roll = module.rollout(list(range(n_prompts)))
        sync(device)
        t1 = time.perf_counter()
        idx = module.minibatch_index(
            roll["input_ids"].shape[0], torch.Generator().manual_seed(seed)
        )
        with amp():
            logp, mask, batch = module.loss_inputs(roll, idx.to(device))
            value, _ = module.loss(logp, mask, batch, module.options)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sync(device)
        return sampler.seconds, t1 - t0 - sampler.seconds, time.perf_counter() - t1

    once()  # warm-up (allocator, kernels, optimizer state)
    gen, rescore, update = once()
    return {
        "generate_s": gen,
        "rescore_s": rescore,
        "update_s": update,
        "total_s": gen + rescore + update,
        "reference_pass": ref is not None,
        "harness_updates_per_rollout": int(alg.updates_per_rollout),
    }


# -- vLLM generation -------------------------------------------------------------------------
def vllm_generation(model, B: int, P: int, T: int, group: int) -> dict[str, float] | None:
    """Generated tokens/s of vLLM on the same model (saved to a temporary directory)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        return None
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        llm = LLM(
            model=d,
            skip_tokenizer_init=True,
            dtype="bfloat16",
            gpu_memory_utilization=0.3,
            max_model_len=P + T,
            seed=0,
            generation_config="vllm",
        )
        g = torch.Generator().manual_seed(0)
        prompts = [
            {
                "prompt_token_ids": torch.randint(
                    3, model.config.vocab_size, (P,), generator=g
                ).tolist()
            }
            for _ in range(B // group)
        ]
        params = SamplingParams(
            n=group, temperature=1.0, min_tokens=T, max_tokens=T, detokenize=False
        )
        llm.generate(prompts, params, use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        del llm
    return {"engine": "vllm", "seconds": seconds, "tokens_per_s": B * T / seconds}


# -- the run -----------------------------------------------------------------------------------
def run(args) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.manual_seed(0)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    cuda = device.type == "cuda"
    # as the harness runs: fp32 master weights under bf16 autocast for training (trainer
    # precision bf16-mixed) and bf16 weights for scoring (backbone.dtype); or float32 throughout
    bf16 = args.precision == "bf16-mixed"
    amp = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if bf16
        else contextlib.nullcontext
    )
    peak, peak_source = peak_flops(device, args.peak_tflops)
    fused, skipped = fused_backends(args, device)
    for why in skipped.values():
        print(f"not timed: {why}", flush=True)
    model = build_model(args.preset, max(seq_lens), args.quick).to(device).train()
    vocab, N = model.config.vocab_size, matmul_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scorer = (
        build_model(args.preset, max(seq_lens), args.quick)
        .to(device, torch.bfloat16 if bf16 else torch.float32)
        .eval()
    )
    res: dict[str, Any] = {
        "meta": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if cuda
            else platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "preset": args.preset,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "params": sum(p.numel() for p in model.parameters()),
            "matmul_params": N,
            "vocab": vocab,
            "seq_lens": seq_lens,
            "prompt_len": args.prompt_len,
            "chunk_size": args.chunk_size,
            "train_precision": args.precision,
            "score_dtype": "bfloat16" if bf16 else "float32",
            "peak_flops": peak,
            "peak_flops_source": peak_source,
            "warmup": args.warmup,
            "reps": args.reps,
            "quick": args.quick,
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average_at_start": os.getloadavg()[0],
            "fused_backends": list(fused),
            "fused_skipped": skipped,
        },
        "steps": [],
        "scoring": [],
        "memory": [],
        "online": [],
        "generation": [],
    }

    for S in seq_lens:
        B = args.batch or max(1, args.tokens_per_step // S)
        T = S - args.prompt_len
        if T < 1:
            raise SystemExit(f"--seq-lens {S} <= --prompt-len {args.prompt_len}")
        batch, cache = random_batch(B, args.prompt_len, T, vocab, device)
        tokens = B * S
        for name, fn in step_fns(model, opt, batch, cache, args.chunk_size, amp, fused).items():
            if name == "naive" and args.skip_naive:
                continue
            # first call outside the measurement: the optimizer state exists before memory is measured
            row = measure(
                fn, device, args, tokens=tokens, flops_per_token=6 * N, peak=peak, warm_call=True
            )
            if row.get("oom"):
                opt.zero_grad(set_to_none=True)
            res["steps"].append({"seq_len": S, "batch": B, "tokens": tokens, "method": name} | row)
        for name, fn in score_fns(scorer, batch.to(device), args.chunk_size, fused).items():
            row = measure(fn, device, args, tokens=tokens, flops_per_token=2 * N, peak=peak)
            res["scoring"].append(
                {"seq_len": S, "batch": B, "tokens": tokens, "method": name} | row
            )
        _progress(res, S)

    res["memory"] = memory_comparison(args, device, amp, fused)
    S = args.online_seq_len or seq_lens[0]
    B = args.batch or max(1, args.tokens_per_step // S)
    group = min(args.group_size, B)
    B = B // group * group
    T = S - args.prompt_len
    if not args.skip_online:
        disa_s = timed(
            step_fns(
                model,
                opt,
                *random_batch(B, args.prompt_len, T, vocab, device),
                args.chunk_size,
                amp,
            )["disa"],
            device,
            args.warmup,
            args.reps,
        )
        del model, opt, scorer
        factory = lambda: build_model(args.preset, max(seq_lens), args.quick)  # noqa: E731
        for alg in ("flowrl", "grpo"):
            r = online_update(alg, factory, B, args.prompt_len, T, group, device, amp)
            u = r["harness_updates_per_rollout"]
            res["online"].append(
                {
                    "algorithm": alg,
                    "seq_len": S,
                    "trajectories": B,
                    "group_size": group,
                    **r,
                    "disa_update_s": disa_s,
                    "ratio_to_disa": r["total_s"] / disa_s,
                    # the harness amortises one rollout over `updates_per_rollout` updates
                    "ratio_to_disa_amortised": (
                        (r["generate_s"] + r["rescore_s"]) / u + r["update_s"]
                    )
                    / disa_s,
                }
            )
        gen_tokens = B * T
        hf_gen = [o for o in res["online"] if o["algorithm"] == "grpo"][0]["generate_s"]
        res["generation"].append(
            {
                "engine": "hf",
                "seconds": hf_gen,
                "tokens_per_s": gen_tokens / hf_gen,
                "seq_len": S,
                "new_tokens": T,
                "sequences": B,
            }
        )
        vl = (
            vllm_generation(factory().to(device, torch.bfloat16), B, args.prompt_len, T, group)
            if cuda
            else None
        )
        if vl:
            res["generation"].append({**vl, "seq_len": S, "new_tokens": T, "sequences": B})
    res["targets"] = targets(res, cuda)
    # other processes on the machine skew timings
    res["meta"]["load_average_at_end"] = os.getloadavg()[0]
    return res


def memory_comparison(args, device, amp, fused: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Peak memory of chunked and fused against naive log-probs, with and without gradients, at
    the real vocabulary: a tiny Qwen2-shaped model on CPU, the preset model on GPU."""
    if device.type == "cuda" and args.preset == "qwen0.5b" and not args.quick:
        model = build_model("qwen0.5b", args.mem_seq_len).to(device)
    else:
        shape = dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(
            qwen_config(args.mem_vocab, max_position_embeddings=args.mem_seq_len, **shape)
        ).to(device)
    B, P = args.mem_batch, args.prompt_len
    T = args.mem_seq_len - P
    batch, _ = random_batch(B, P, T, model.config.vocab_size, device)
    n = B * T
    rows = []
    for grad in (False, True):
        base = None
        # one chunk, four, the default
        chunks = sorted({n, max(1, n // 4), min(args.chunk_size, n)}, reverse=True)
        for name, c in [
            ("naive", None),
            *(("chunked", c) for c in chunks),
            *((impl, None) for impl in fused),
        ]:
            model.zero_grad(set_to_none=True)
            try:
                mib = (
                    peak_memory(partial(_logprob_pass, model, batch, c, grad, amp, name), device)
                    / 2**20
                )
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"grad": grad, "method": name, "chunk_size": c, "oom": True})
                continue
            base = mib if name == "naive" else base
            rows.append(
                {
                    "vocab": model.config.vocab_size,
                    "batch": B,
                    "seq_len": args.mem_seq_len,
                    "completion_tokens": n,
                    "grad": grad,
                    "method": name,
                    "chunk_size": c,
                    "peak_mem_mib": mib,
                    "ratio_to_naive": None if base is None else mib / base,
                }
            )
        model.zero_grad(set_to_none=True)
    return rows


def _logprob_pass(model, batch: Batch, chunk: int | None, grad: bool, amp, impl: str) -> None:
    """Log-probs by ``impl`` (naive | chunked | a fused backend), and their backward when ``grad``."""
    with torch.set_grad_enabled(grad), amp():
        lp = (
            _naive_logprobs(model, batch)
            if impl == "naive"
            else token_logprobs(model, batch, chunk_size=chunk or 2048, impl=impl)
        )
    if grad:
        lp.sum().backward()


def targets(res: dict, cuda: bool) -> dict[str, dict[str, Any]]:
    """The stated targets with the measured values (``met`` is None where not measured on GPU)."""

    def steps(method):
        return {r["seq_len"]: r for r in res["steps"] if r["method"] == method and not r.get("oom")}

    disa, sft, sft_hf = steps("disa"), steps("sft_chunked"), steps("sft_hf")
    score = {
        r["seq_len"]: r for r in res["scoring"] if r["method"] == "chunked" and not r.get("oom")
    }
    # the chunked peak is one chunk's buffer: the ratio falls as tokens / chunk_size grows (both
    # peaks are linear in the sizes), and the target is stated for batches of >= 4 chunks
    mem = [
        r["ratio_to_naive"]
        for r in res["memory"]
        if r["method"] == "chunked"
        and r.get("ratio_to_naive") is not None
        and 4 * r["chunk_size"] <= r["completion_tokens"]
    ]
    flowrl = [r for r in res["online"] if r["algorithm"] == "flowrl"]
    fused = [
        disa[r["seq_len"]]["seconds"] / r["seconds"]
        for r in res["steps"]
        if r["method"].startswith("disa_") and not r.get("oom") and r["seq_len"] in disa
    ]
    values = {
        "disa_mfu": min((r["mfu"] for r in disa.values()), default=None),
        "disa_vs_sft": min(
            (disa[s]["tokens_per_s"] / sft[s]["tokens_per_s"] for s in disa if s in sft),
            default=None,
        ),
        "disa_vs_sft_hf": min(
            (disa[s]["tokens_per_s"] / sft_hf[s]["tokens_per_s"] for s in disa if s in sft_hf),
            default=None,
        ),
        "logprob_memory_ratio": max(mem, default=None),
        "scoring_mfu": min((r["mfu"] for r in score.values()), default=None),
        "flowrl_over_disa": flowrl[0]["ratio_to_disa"] if flowrl else None,
        "disa_fused_vs_chunked": max(fused, default=None),
    }
    out = {}
    for key, (what, rule) in TARGETS.items():
        v = values[key]
        met = None
        if v is not None and rule != "reported" and (cuda or key == "logprob_memory_ratio"):
            op, x = rule.split()
            met = bool(v >= float(x)) if op == ">=" else bool(v <= float(x))
        out[key] = {"what": what, "target": rule, "value": v, "met": met}
    return out


# -- report ------------------------------------------------------------------------------------
def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``cols`` = (key, header, format)."""
    lines = [
        "| " + " | ".join(h for _, h, _ in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                "OOM" if r.get("oom") and k in ("seconds", "peak_mem_mib") else _fmt(r.get(k), f)
                for k, _, f in cols
            )
            + " |"
        )
    return "\n".join(lines)


def report(res: dict) -> str:
    m = res["meta"]
    out = [
        f"device: {m['device']} ({m['device_name']}, {m['cpu_cores']} cores), preset {m['preset']}: "
        f"{m['params'] / 1e6:.3g}M parameters ({m['matmul_params'] / 1e6:.3g}M doing matrix work), vocab {m['vocab']}, "
        f"prompt {m['prompt_len']} tokens, chunk_size {m['chunk_size']}; peak {m['peak_flops'] / 1e12:.3g} TFLOP/s "
        f"({m['peak_flops_source']})",
        "",
        "training step (one optimizer step; tokens = batch × seq_len):",
        table(
            res["steps"],
            [
                ("seq_len", "seq", "d"),
                ("batch", "batch", "d"),
                ("method", "method", ""),
                ("seconds", "s/step", ".4g"),
                ("tokens_per_s", "tokens/s", ".4g"),
                ("mfu", "MFU", ".2%"),
                ("peak_mem_mib", "peak MiB", ".1f"),
            ],
        ),
        "",
        "scoring (no grad):",
        table(
            res["scoring"],
            [
                ("seq_len", "seq", "d"),
                ("batch", "batch", "d"),
                ("method", "method", ""),
                ("seconds", "s", ".4g"),
                ("tokens_per_s", "tokens/s", ".4g"),
                ("mfu", "MFU", ".2%"),
                ("peak_mem_mib", "peak MiB", ".1f"),
            ],
        ),
        "",
        "log-prob peak memory, chunked vs naive:",
        table(
            res["memory"],
            [
                ("vocab", "vocab", "d"),
                ("completion_tokens", "tokens", "d"),
                ("grad", "grad", ""),
                ("method", "method", ""),
                ("chunk_size", "chunk", "d"),
                ("peak_mem_mib", "peak MiB", ".1f"),
                ("ratio_to_naive", "/ naive", ".3f"),
            ],
        ),
    ]
    if res["online"]:
        out += [
            "",
            "one online update vs one DISA update (same trajectories and lengths):",
            table(
                res["online"],
                [
                    ("algorithm", "algorithm", ""),
                    ("trajectories", "traj", "d"),
                    ("seq_len", "seq", "d"),
                    ("generate_s", "generate s", ".4g"),
                    ("rescore_s", "old/ref s", ".4g"),
                    ("update_s", "update s", ".4g"),
                    ("total_s", "total s", ".4g"),
                    ("disa_update_s", "DISA s", ".4g"),
                    ("ratio_to_disa", "× DISA", ".3g"),
                    ("ratio_to_disa_amortised", "× DISA (rollout/2)", ".3g"),
                ],
            ),
            "",
            "generation:",
            table(
                res["generation"],
                [
                    ("engine", "engine", ""),
                    ("sequences", "sequences", "d"),
                    ("new_tokens", "new tokens", "d"),
                    ("seconds", "s", ".4g"),
                    ("tokens_per_s", "tokens/s", ".4g"),
                ],
            ),
        ]
    out += [
        "",
        "targets:",
        table(
            [{"k": k, **v} for k, v in res["targets"].items()],
            [
                ("what", "what", ""),
                ("target", "target", ""),
                ("value", "measured", ".3g"),
                ("met", "met", ""),
            ],
        ),
    ]
    return "\n".join(out)


def _progress(res: dict, S: int) -> None:
    rows = [r for r in res["steps"] + res["scoring"] if r["seq_len"] == S and not r.get("oom")]
    print(
        f"seq_len {S}: " + ", ".join(f"{r['method']} {r['tokens_per_s']:.3g} tok/s" for r in rows),
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--preset",
        choices=["embedded", "qwen-tiny", "qwen0.5b"],
        default=None,
        help="embedded: the embedded backbone's shape; qwen-tiny: Qwen2.5's vocabulary (151,936) on a "
        "2-layer, 64-wide body (CPU); qwen0.5b: Qwen2.5-0.5B's shape; random weights "
        "(default: qwen0.5b on cuda, embedded on cpu)",
    )
    p.add_argument(
        "--seq-lens", default=None, help="comma-separated sequence lengths (prompt + completion)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (default: tokens-per-step / seq_len)",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="tokens per step when --batch is not given",
    )
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens of every sequence")
    p.add_argument(
        "--chunk-size", type=int, default=2048, help="scoring.chunk_size of token_logprobs"
    )
    p.add_argument(
        "--precision",
        choices=["bf16-mixed", "32-true"],
        default=None,
        help="training precision (scoring then in bf16 or float32); default bf16-mixed on cuda, 32-true on cpu",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--group-size", type=int, default=8, help="completions per prompt of the online updates"
    )
    p.add_argument(
        "--online-seq-len", type=int, default=None, help="sequence length of the online comparison"
    )
    p.add_argument("--skip-online", action="store_true")
    p.add_argument(
        "--skip-naive", action="store_true", help="skip the naive training step (it may not fit)"
    )
    p.add_argument(
        "--impls",
        default="liger,cce",
        help="fused log-prob backends timed beside chunked and naive (scoring.logprob_impl); each is "
        "skipped, with the reason printed, where it cannot run (CPU, extra not installed); '' for none",
    )
    p.add_argument(
        "--mem-vocab", type=int, default=QWEN_VOCAB, help="vocabulary of the CPU memory comparison"
    )
    p.add_argument("--mem-batch", type=int, default=None)
    p.add_argument("--mem-seq-len", type=int, default=None)
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="override the MFU denominator (TFLOP/s)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repetition: a smoke test in seconds"
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output (default: outputs/benchmark/benchmark-PRESET-DEVICE.json)",
    )
    a = p.parse_args(argv)
    a.preset = a.preset or ("qwen0.5b" if a.device == "cuda" else "embedded")
    a.impls = tuple(i.strip() for i in a.impls.split(",") if i.strip())
    a.precision = a.precision or ("bf16-mixed" if a.device == "cuda" else "32-true")
    gpu = a.preset == "qwen0.5b" and not a.quick
    defaults = {
        "seq_lens": "1024,2048,4096" if gpu else "32,128,512",
        "tokens_per_step": 16384 if gpu else 4096,
        "prompt_len": 64 if gpu else 8,
        "mem_batch": 4,
        "mem_seq_len": 4096 if gpu else 528,
    }
    if a.quick:
        defaults |= {"seq_lens": "16", "tokens_per_step": 64, "mem_batch": 4, "mem_seq_len": 72}
        a.mem_vocab = 4096 if a.mem_vocab == QWEN_VOCAB else a.mem_vocab
        a.warmup, a.reps, a.group_size = 0, 1, min(a.group_size, 2)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.mem_seq_len <= a.prompt_len:
        a.mem_seq_len = a.prompt_len + 16
    a.out = a.out or f"outputs/benchmark/benchmark-{a.preset}-{a.device}.json"
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    print(report(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
