"""The one sequence-log-prob function, used for training, scoring and evaluation.

Layout of a batch (as in most RL-for-LM code): prompts left-padded to a common length
``P``, completions right-padded to ``T``, so every completion starts at column ``P`` and the
per-token log-probs come out as a ``[B, T]`` tensor aligned with the completion tokens.

The vocabulary projection is the memory wall for large vocabularies: instead of a float32
``[B, P+T, V]`` logits tensor, the backbone's hidden states are gathered at the completion
positions only and projected in row chunks, so at most one float32 ``chunk_size × V`` buffer
exists at once. With gradients, a custom autograd function keeps only the per-row logsumexp
and recomputes each chunk's logits once in backward, turning them in place into their
gradient (see :class:`_ChunkedLogProbs`); ``benchmark.py`` measures the peak against the
naive full-logits path.

``temperature``/``top_k``/``top_p`` give the log-density of the *processed* distribution a
sampler actually drew from (HF's order: temperature, then top-k, then top-p), which is what
``log μ`` must be for importance sampling; the defaults give the model's own density.

On a GPU the model's own density (temperature 1, no top-k/top-p) can also come from a fused
kernel that never materialises a chunk of logits (``impl``, the training's
``scoring.logprob_impl``): liger-kernel's fused linear cross-entropy (``liger``) or Apple's
cut-cross-entropy (``cce``), both Triton and CUDA only, optional extras imported here alone.
They compute the same function as the chunked path, which stays the reference: processed
densities always take it, and the tests compare the fused ones against it on a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: backends of :func:`token_logprobs` (``scoring.logprob_impl``): the chunked projection, or a
#: fused kernel → (the module it imports, the extra that installs it)
LOGPROB_IMPLS = {
    "chunked": None,
    "liger": ("liger_kernel", "liger"),
    "cce": ("cut_cross_entropy", "cce"),
}


class LogProbBackendError(RuntimeError):
    """A fused log-prob backend that cannot run here (the message names the setting)."""


def logprob_impl_problem(
    impl: str, *, on_cuda: bool, half_precision: bool | None = None
) -> str | None:
    """Why the backend ``impl`` cannot compute log-probs here, or None where it can.

    ``on_cuda``: the log-probs are computed on a CUDA device; ``half_precision``: in bf16 or
    fp16 (None: not known yet). cut-cross-entropy's backward takes bf16/fp16 inputs only.
    """
    if impl not in LOGPROB_IMPLS:
        return f"scoring.logprob_impl={impl!r} is not known; allowed: {list(LOGPROB_IMPLS)}"
    if LOGPROB_IMPLS[impl] is None:
        return None
    module, extra = LOGPROB_IMPLS[impl]
    if not on_cuda:
        return (
            f"scoring.logprob_impl={impl!r} runs Triton kernels on a CUDA device, but training runs on the "
            "CPU; allowed: 'chunked' (or a GPU trainer, e.g. trainer=gpu)"
        )
    if importlib.util.find_spec(module) is None:
        return (
            f"scoring.logprob_impl={impl!r} is not installed: it needs the {extra!r} extra: "
            f"pip install 'disa[{extra}]' (or use scoring.logprob_impl=chunked)"
        )
    if impl == "cce" and half_precision is False:
        return (
            "scoring.logprob_impl='cce' needs bf16 or fp16 compute (cut-cross-entropy's backward takes no "
            "float32): trainer.precision=bf16-mixed, or scoring.logprob_impl=liger / chunked"
        )
    return None


@dataclass
class Batch:
    """Token tensors of a batch of (prompt, completion) pairs.

    input_ids:       [B, P+T] left-padded prompts then right-padded completions
    attention_mask:  [B, P+T]
    position_ids:    [B, P+T] positions counted from each sequence's first real token
    completion_mask: [B, T]   1 on completion tokens
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    def to(self, device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.position_ids,
                    self.completion_mask,
                )
            )
        )


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> Batch:
    """Pack token-id lists into a :class:`Batch` (prompts left-, completions right-padded)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        # a copy: lists and the read-only arrays read from parquet go in alike
        ids[i, P - len(p) : P] = torch.from_numpy(np.array(p, dtype=np.int64))
        ids[i, P : P + len(c)] = torch.from_numpy(np.array(c, dtype=np.int64))
        attn[i, P - len(p) : P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, attn, pos, attn[:, P:].clone())


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Apply sampling transforms exactly as HF ``generate`` does (temperature → top-k → top-p);
    removed tokens get ``-inf``. ``logits``: [N, V] float."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's (``bf16-mixed``) if on, else the weight's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _chunk_forward(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), logsumexp)`` ``[n]`` each, with a single float32 ``[n, V]`` buffer
    (modified in place)."""
    logits = process_logits(F.linear(h, w, b).float(), temperature, top_k, top_p)  # [n, V]
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    m = logits.amax(-1, keepdim=True)  # finite: processing always keeps a token
    lse = logits.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
    return target - lse, lse


def _project(h, weight, bias, targets, chunk_size, temperature, top_k, top_p, dtype):
    """Chunked forward of :class:`_ChunkedLogProbs`: ``(log p(target), logsumexp)`` ``[N]``."""
    with torch.autocast(h.device.type, enabled=False):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk_size):
            out[s : s + chunk_size], lse[s : s + chunk_size] = _chunk_forward(
                h[s : s + chunk_size].to(dtype),
                w,
                b,
                targets[s : s + chunk_size],
                temperature,
                top_k,
                top_p,
            )
    return out, lse


class _ChunkedLogProbs(torch.autograd.Function):
    """``log softmax(process(h Wᵀ + b))[target]`` for ``N`` rows, ``chunk_size`` rows at a time.

    Nothing of size ``N × V`` is kept for backward: only the per-row logsumexp. The backward
    recomputes each chunk's logits once and turns them, in place, into the gradient
    ``g · (onehot(target) − softmax) / temperature`` (top-k/top-p masks pass no gradient), so
    a chunk costs one float32 ``[n, V]`` buffer (plus its copy in the compute dtype under
    bf16 autocast) in either direction. Autograd through the same ops would hold several.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, temperature, top_k, top_p):
        dtype = _compute_dtype(h, weight)
        out, lse = _project(h, weight, bias, targets, chunk_size, temperature, top_k, top_p, dtype)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.settings = (chunk_size, temperature, top_k, top_p, dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, temperature, top_k, top_p, dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        # accumulated transposed ([H, V]): addmm then reads the [n, V] chunk gradient as stored
        # (a transposed [V, n] operand would be copied on CPU)
        grad_wt = weight.new_zeros(weight.shape[::-1], dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for s in range(0, h.shape[0], chunk_size):
                hc, g, t = (
                    h[s : s + chunk_size].to(dtype),
                    grad_out[s : s + chunk_size].float(),
                    targets[s : s + chunk_size],
                )
                # [n, V]
                logits = process_logits(F.linear(hc, w, b).float(), temperature, top_k, top_p)
                # a masked target has no gradient
                kept = torch.isfinite(logits.gather(-1, t[:, None]))
                # −g·softmax
                grad = logits.sub_(lse[s : s + chunk_size, None]).exp_().mul_(-g[:, None])
                grad.scatter_add_(-1, t[:, None], torch.where(kept, g[:, None], 0.0))
                if temperature != 1.0:
                    grad.div_(temperature)
                grad = grad.to(dtype)
                if need_h:
                    grad_h[s : s + chunk_size] = (grad @ w).to(h.dtype)
                if need_w:
                    if dtype == torch.float32:
                        grad_wt.addmm_(hc.T, grad)
                    else:
                        grad_wt.add_(hc.T @ grad)
                if need_b:
                    grad_b.add_(grad.float().sum(0))
                del logits, grad  # before the next chunk's buffer is allocated
        return (
            grad_h,
            None if grad_wt is None else grad_wt.T.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _fused(
    impl: str,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """``log softmax(h Wᵀ + b)[target]`` ``[N]`` (float32) by the fused kernel ``impl``, in the
    compute dtype the chunked path would use; gradients reach ``h``, ``weight`` and ``bias``."""
    dtype = _compute_dtype(h, weight)
    problem = logprob_impl_problem(
        impl,
        on_cuda=h.device.type == "cuda",
        half_precision=dtype in (torch.bfloat16, torch.float16),
    )
    if problem:
        raise LogProbBackendError(problem)
    with torch.autocast(h.device.type, enabled=False):
        h, w = h.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        if impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            # reduction="none": per-token losses, whose backward takes per-token gradients (DISA's
            # differ per sequence); weight gradients accumulated in float32 as the chunked path does
            nll = liger_fused_linear_cross_entropy(
                h, w, targets, b, reduction="none", accum_dtype=torch.float32
            )
        else:
            if b is not None:
                raise LogProbBackendError(
                    "scoring.logprob_impl='cce' takes no output-head bias, and this model's "
                    "head has one; allowed: 'liger' or 'chunked'"
                )
            from cut_cross_entropy import linear_cross_entropy

            # filter_eps=None: the exact gradient. Its default skips softmax entries below bf16
            # resolution, which on a flat softmax (a large vocabulary early in training) is most of them.
            nll = linear_cross_entropy(h, w, targets, reduction="none", filter_eps=None)
    return -nll.float()


def decoder_and_head(model):
    """The causal LM's decoder (hidden states) and output embedding, through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return inner.get_decoder(), inner.get_output_embeddings()


def token_logprobs(
    model,
    batch: Batch,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int = 2048,
    impl: str = "chunked",
    return_hidden: bool = False,
):
    """Per-token log-probs of the completion tokens under ``model``: ``[B, T]``, 0 where
    ``completion_mask`` is 0. With ``return_hidden`` also the last hidden states
    ``[B, P+T, H]`` (FlowRL's log Z head pools them over the prompt).

    ``impl``: a key of :data:`LOGPROB_IMPLS`. A fused backend computes the model's own density
    only; with ``temperature``/``top_k``/``top_p`` the chunked path runs whatever ``impl`` says."""
    decoder, head = decoder_and_head(model)
    # [B, P+T, H]
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    P = batch.prompt_len
    mask = batch.completion_mask.bool()  # [B, T]
    h = hidden[:, P - 1 : -1][mask]  # [N, H]: the state that predicts each completion token
    targets = batch.input_ids[:, P:][mask]  # [N]
    if impl != "chunked" and temperature == 1.0 and not top_k and top_p >= 1.0:
        lp = _fused(impl, h, head.weight, head.bias, targets)
    elif torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        lp = _ChunkedLogProbs.apply(
            h, head.weight, head.bias, targets, chunk_size, temperature, top_k, top_p
        )
    else:
        lp, _ = _project(
            h,
            head.weight,
            head.bias,
            targets,
            chunk_size,
            temperature,
            top_k,
            top_p,
            _compute_dtype(h, head.weight),
        )
    out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    out = out.masked_scatter(mask, lp)
    return (out, hidden) if return_hidden else out


@torch.no_grad()
def sequence_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int = 2048,
    progress: str | None = None,
) -> torch.Tensor:
    """Summed completion log-probs ``[N]`` (float64) for many pairs, batched by length so
    that similar lengths share a batch and padding stays small."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    out = torch.empty(len(prompts), dtype=torch.float64)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        idx = order[s : s + batch_size]
        batch = pack([prompts[i] for i in idx], [completions[i] for i in idx], pad_id).to(device)
        lp = token_logprobs(
            model, batch, temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=chunk_size
        )
        out[idx] = lp.double().sum(-1).cpu()
    return out
