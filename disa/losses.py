"""Loss functions of every algorithm, behind one registry, plus their shared building blocks.

The contract (one for all losses):

- every loss is ``loss(logp, mask, batch, options) -> (loss, metrics)``;
- ``logp [B, T]``: the current policy's per-token log-probs of the completion tokens (has
  grad); where ``mask`` is 0 it may hold any finite value and is ignored;
- ``mask [B, T]``: 1 (or True) on completion tokens;
- ``batch``: named tensors from :data:`BATCH_FIELDS`, the one schema every training loop
  builds batches in. Each loss is registered with the fields it reads (``needs``, which may
  depend on its options), so a loop builds exactly those and nothing is adapted privately.
  Everything that comes from a cache, an old policy or the reference is ``.detach()``-ed
  here, so no gradient can ever reach it;
- ``options``: the loss's own frozen dataclass (``algorithm.loss_args``; DISA also takes
  the run's β), built and checked by :meth:`LossSpec.make_options` before any work starts.

``loss`` is a scalar tensor; ``metrics`` maps names to detached python floats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

#: The batch schema: field → (shape, meaning). ``B`` trajectories, ``T`` completion positions.
BATCH_FIELDS: dict[str, tuple[str, str]] = {
    "reward": ("[B]", "verifiable reward r(q, o)"),
    "log_z_hat": ("[B]", "the frozen anchor log Ẑ(q) of the trajectory's prompt"),
    "log_z": ("[B]", "a learned log Z_φ(q) (FlowRL's head; has grad)"),
    "logp_ref_seq": ("[B]", "Σ_t log π_ref(o_t | q, o_<t)"),
    "logp_ref_tok": ("[B, T]", "log π_ref per completion token"),
    "logp_old_seq": ("[B]", "Σ_t log π_old, the policy that sampled the rollout"),
    "logp_old_tok": ("[B, T]", "log π_old per completion token"),
    "advantages": ("[B]", "group-normalised rewards (see group_normalize)"),
    "group_ids": ("[B]", "integer id of the rollout group (prompt) of each trajectory"),
}
#: fields that only a reference-model forward pass gives (the cache holds logp_ref_seq too)
REFERENCE_FIELDS = frozenset({"logp_ref_seq", "logp_ref_tok"})

LossFn = Callable[[Tensor, Tensor, Mapping[str, Tensor], Any], tuple[Tensor, dict[str, float]]]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALES = ("group", "batch", "none")
# exp() of a log-ratio is evaluated on at most this magnitude (as verl does), so that a
# wildly off-policy token gives a large finite ratio instead of inf (and inf·0 = NaN).
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, its options and the batch fields it reads."""

    name: str
    fn: LossFn
    options: type  #: frozen dataclass of the loss's settings
    needs: Callable[[Any], frozenset[str]]  #: options → the BATCH_FIELDS the loss reads

    def make_options(
        self,
        loss_args: Mapping[str, Any] | None = None,
        beta: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Any:
        """The options from ``algorithm.loss_args``; ``beta`` (the run's β) goes to the losses
        that declare it, and ``max_new_tokens`` (the sampler's completion cap) becomes
        ``norm_len``, Dr. GRPO's constant, where the loss has one and ``loss_args`` leaves it
        unset. Unknown keys are an error naming the allowed ones."""
        names = {f.name for f in fields(self.options)}
        given = dict(loss_args or {})
        unknown = sorted(set(given) - (names - {"beta"}))
        if unknown:
            raise ValueError(
                f"algorithm.loss_args has {unknown}, which the {self.name!r} loss does not take; "
                f"allowed: {sorted(names - {'beta'})}"
                + (" (β is the top-level `beta`)" if "beta" in unknown else "")
            )
        if "beta" in names:
            given["beta"] = beta
        if "norm_len" in names and given.get("norm_len") is None and max_new_tokens is not None:
            given["norm_len"] = int(max_new_tokens)
        return self.options(**given)

    def reads_reference(self, options: Any) -> bool:
        """Whether the loss reads reference log-probs (offline they come from the cache;
        online only a reference forward pass gives them)."""
        return bool(self.needs(options) & REFERENCE_FIELDS)

    def __reduce__(self):
        # pickled by name (ddp_spawn sends the module to other processes): the registry is
        # the loss's identity, and its needs functions are lambdas
        return get_loss, (self.name,)

    def __call__(
        self, logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: Any
    ) -> tuple[Tensor, dict[str, float]]:
        check_batch(self.needs(options), batch, len(logp))
        return self.fn(logp, mask, batch, options)


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, options: type, needs: Callable[[Any], frozenset[str] | set[str]]
) -> Callable[[LossFn], LossFn]:
    """Decorator: add the function to :data:`LOSSES` under ``name`` with its options class and
    the batch fields it reads."""

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = LossSpec(name, fn, options, lambda o: frozenset(needs(o)))
        return fn

    return add


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"algorithm.loss={name!r} is not registered; allowed: {sorted(LOSSES)}")
    return LOSSES[name]


def check_batch(needs: frozenset[str], batch: Mapping[str, Tensor], B: int) -> None:
    """Refuse a batch that lacks a field the loss reads or holds it in the wrong shape."""
    missing = sorted(needs - set(batch))
    if missing:
        raise KeyError(f"the loss needs batch fields {missing}; got {sorted(batch)}")
    for name in needs:
        shape, x = BATCH_FIELDS[name][0], batch[name]
        dims = 2 if shape == "[B, T]" else 1
        if x.dim() != dims or x.shape[0] != B:
            raise ValueError(
                f"batch[{name!r}] has shape {list(x.shape)}; the schema says {shape} with B={B}"
            )


# -- building blocks ---------------------------------------------------------------------------


def aggregate(values: Tensor, mask: Tensor, mode: str, norm_len: int | None = None) -> Tensor:
    """Reduce per-token ``values [B, T]`` over the valid tokens of ``mask [B, T]`` to a scalar.

    - ``token-mean``: Σ valid values / number of valid tokens in the batch.
    - ``seq-mean-token-mean``: mean over each sequence's tokens, then mean over the B sequences.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): Σ over each sequence's tokens / ``norm_len``,
      then mean over the B sequences. ``norm_len`` is a constant of the run (Dr. GRPO and TRL
      take the maximum completion length; the losses get the sampler's ``max_new_tokens``),
      never the padded width ``T`` of the batch at hand, which would change the scale of the
      loss from one rollout to the next; this mode refuses to run without it.

    A sequence without valid tokens contributes 0 (never NaN) and still counts among the B.

    >>> aggregate(torch.tensor([[1.0, 3.0], [5.0, 9e9]]), torch.tensor([[1, 1], [1, 0]]), "token-mean")
    tensor(3.)
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; allowed: {list(AGG_MODES)}")
    m = mask.bool()
    # where, not multiplication: a garbage value (inf) on padding must not turn into NaN.
    per_seq = torch.where(m, values, torch.zeros_like(values)).sum(-1)  # [B]
    n = m.sum(-1).to(values.dtype)  # [B]
    if mode == "token-mean":
        return per_seq.sum() / n.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (per_seq / n.clamp(min=1)).mean()
    if norm_len is None:
        raise ValueError(
            "loss_agg_mode='seq-mean-token-sum-norm' needs norm_len (Dr. GRPO's constant, the "
            "maximum completion length): set algorithm.loss_args.norm_len, or leave it unset for "
            "sampler.max_new_tokens"
        )
    return (per_seq / norm_len).mean()


def group_normalize(
    rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages ``[B]`` of ``rewards [B]`` in the groups ``group_ids [B]`` (int).

    ``reward − group mean``, divided by ``unbiased std + eps`` of the group (``"group"``) or of
    the whole batch (``"batch"``), or not divided (``"none"``, Dr. GRPO). A group of size 1 has
    std 0 (not NaN); a group whose rewards are all equal gets advantages exactly 0.

    >>> group_normalize(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), "none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale not in SCALES:
        raise ValueError(f"unknown reward scale {scale!r}; allowed: {list(SCALES)}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    zeros = r.new_zeros(len(uniq))
    n = zeros.index_add(0, inv, torch.ones_like(r))
    centred = r - (zeros.index_add(0, inv, r) / n)[inv]
    # Σx/n need not reproduce x exactly in floating point, so an all-equal group is found
    # by max == min and zeroed explicitly (else ~1e-17 / eps would leak through).
    g_max = r.new_full((len(uniq),), -torch.inf).scatter_reduce(0, inv, r, "amax")
    g_min = r.new_full((len(uniq),), torch.inf).scatter_reduce(0, inv, r, "amin")
    centred = torch.where((g_max == g_min)[inv], torch.zeros_like(r), centred)
    if scale == "group":
        std = (zeros.index_add(0, inv, centred**2) / (n - 1).clamp(min=1)).sqrt()
        return centred / (std[inv] + eps)
    if scale == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
        return centred / (std + eps)
    return centred


def sequence_logprob(logp: Tensor, mask: Tensor) -> Tensor:
    """Σ over the valid tokens: ``logp [B, T]``, ``mask [B, T]`` → ``[B]``."""
    return torch.where(mask.bool(), logp, torch.zeros_like(logp)).sum(-1)


def _prepare(logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, mask, length)``: logp at least float32 with padding set to 0 (so no nonlinearity
    ever sees the garbage there, whose gradient could be NaN), a bool mask, and the number of
    valid tokens per sequence ``[B]`` (at least 1, so dividing by it is safe)."""
    m = mask.bool()
    x = logp.to(torch.promote_types(logp.dtype, torch.float32))
    x = torch.where(m, x, torch.zeros_like(x))
    return x, m, m.sum(-1).clamp(min=1).to(x.dtype)


def _const(
    batch: Mapping[str, Tensor], key: str, like: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``batch[key]`` detached, in ``like``'s dtype; token-level ones with padding set to 0.
    (:func:`check_batch` has already refused a batch without the key.)"""
    x = batch[key].detach().to(dtype=like.dtype, device=like.device)
    return x if mask is None else torch.where(mask, x, torch.zeros_like(x))


def _clip_range(options: Any, low: float, high: float) -> tuple[float, float]:
    """``(ε_low, ε_high)``: ``clip_eps_low``/``clip_eps_high`` override ``clip_eps``, which
    overrides the defaults ``low``/``high``."""
    if options.clip_eps is not None:
        low = high = float(options.clip_eps)
    pick = lambda v, default: float(default if v is None else v)  # noqa: E731
    return pick(options.clip_eps_low, low), pick(options.clip_eps_high, high)


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor]:
    """PPO's ``−min(ρA, clip(ρ, 1−low, 1+high)A)`` and where the clipped term is the active one
    (then the gradient is 0: the update has already moved the ratio far enough)."""
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    active = clipped > unclipped
    return torch.where(active, clipped, unclipped), active


def _floats(**values: Tensor | float) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}


# -- losses ------------------------------------------------------------------------------------


def _agg_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"algorithm.loss_args.loss_agg_mode={mode!r}; allowed: {list(AGG_MODES)}")


def _norm_len(norm_len: Any) -> None:
    if norm_len is not None and not (
        isinstance(norm_len, int) and not isinstance(norm_len, bool) and norm_len >= 1
    ):
        raise ValueError(
            f"algorithm.loss_args.norm_len={norm_len!r}; allowed: an integer >= 1, or null for "
            "sampler.max_new_tokens"
        )


@dataclass(frozen=True)
class DisaOptions:
    beta: float  #: the run's inverse temperature β (top-level ``beta``, not a loss_args key)
    length_normalize: bool = (
        False  #: ablation: divide the log-ratio by |o| (changes the fixed point)
    )

    def __post_init__(self):
        if self.beta is None:
            raise ValueError("the disa loss needs β (the top-level `beta` setting)")


@register_loss("disa", DisaOptions, needs=lambda o: {"log_z_hat", "logp_ref_seq", "reward"})
def disa_loss(
    logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: DisaOptions
) -> tuple[Tensor, dict[str, float]]:
    """DISA: trajectory balance against the frozen offline anchor ``log Ẑ(q)``.

    ``δ = log Ẑ + Σ_t logp − logp_ref_seq − β·r``, ``L = mean δ²``. Its minimiser is
    ``π(o|q) = π_ref(o|q) exp(β r) / Ẑ(q)``, the KL-regularised optimum, wherever the cached
    trajectories come from (the squared residual is zero per trajectory there).

    ``length_normalize=True`` (an ablation) uses ``(Σ_t logp − logp_ref_seq)/|o|`` instead: its
    fixed point is no longer the target above, since the anchor was estimated for the
    unnormalised log-ratio.

    Example (B=1, T=2, β=1): logp=[[-1, -2]], mask=[[1, 1]], log_z_hat=[0.5], logp_ref_seq=[-2.5],
    reward=[1] → δ = 0.5 − 3 + 2.5 − 1 = −1, L = 1.
    """
    x, m, length = _prepare(logp, mask)
    log_ratio = x.sum(-1) - _const(batch, "logp_ref_seq", x)  # [B]
    if options.length_normalize:
        log_ratio = log_ratio / length
    reward = _const(batch, "reward", x)
    delta = _const(batch, "log_z_hat", x) + log_ratio - float(options.beta) * reward  # [B]
    loss = delta.pow(2).mean()
    return loss, _floats(
        loss=loss,
        delta_mean=delta.mean(),
        delta_abs_mean=delta.abs().mean(),
        log_ratio_mean=log_ratio.mean(),
        reward_mean=reward.mean(),
    )


@dataclass(frozen=True)
class FlowRLOptions:
    beta_f: float = 15.0  #: FlowRL's reward scale β_f (the paper's default)
    clip_eps: float | None = 0.2  #: importance weight clipped to [1−ε, 1+ε]
    clip_eps_low: float | None = None  #: overrides clip_eps below
    clip_eps_high: float | None = None  #: overrides clip_eps above


@register_loss(
    "flowrl",
    FlowRLOptions,
    needs=lambda o: {"log_z", "logp_ref_seq", "logp_old_seq", "reward", "group_ids"},
)
def flowrl_loss(
    logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: FlowRLOptions
) -> tuple[Tensor, dict[str, float]]:
    """FlowRL (arXiv 2509.15207): trajectory balance with a learned ``log Z_φ(q)``.

    ``δ = log Z_φ + (Σ_t logp)/|o| − logp_ref_seq/|o| − β_f·r̂``, ``r̂`` the group-normalised
    reward, ``w = clip(exp(Σ_t logp − logp_old_seq), 1−ε_low, 1+ε_high)`` detached,
    ``L = mean w·δ²``. The 1/|o| keeps long sequences from dominating the residual; the
    detached, clipped weight corrects for sampling from the old policy without letting one
    trajectory blow up the step.

    This matches ``compute_flowrl_objective`` of the public code (as recalled: masked-mean log-probs,
    ``log_w`` = masked *sum* of the token log-ratios, ``exp(log_w).detach()`` clamped to
    ``[1−clip_ratio, 1+clip_ratio]``, ``torch.mean`` over sequences), with one difference:
    there r̂ is the trainer's GRPO advantage, normalised over whole groups of the rollout before
    minibatching; here it is normalised inside the loss over the groups present in ``batch``,
    so the caller must pass whole groups for the two to agree.

    Example (B=2 one group, T=1, β_f=1): logp=[[-1], [-1]], log_z=[0, 0], logp_ref_seq=[-1, -1],
    logp_old_seq=[-1, -1], reward=[1, 0] → r̂ ≈ [0.707, −0.707], w = 1, L ≈ 0.5.
    """
    x, m, length = _prepare(logp, mask)
    low, high = _clip_range(options, 0.2, 0.2)
    seq = x.sum(-1)  # [B]
    log_z = batch["log_z"].to(x.dtype)  # deliberately not detached: this trains the head
    r_hat = group_normalize(_const(batch, "reward", x), batch["group_ids"].to(x.device), "group")
    delta = (
        log_z + (seq - _const(batch, "logp_ref_seq", x)) / length - float(options.beta_f) * r_hat
    )
    raw_w = torch.exp(seq.detach() - _const(batch, "logp_old_seq", x))
    w = raw_w.clamp(1 - low, 1 + high)
    loss = (w * delta.pow(2)).mean()
    return loss, _floats(
        loss=loss,
        delta_mean=delta.mean(),
        delta_abs_mean=delta.abs().mean(),
        log_z_mean=log_z.mean(),
        weight_mean=w.mean(),
        clip_frac=((raw_w < 1 - low) | (raw_w > 1 + high)).float().mean(),
    )


@dataclass(frozen=True)
class GRPOOptions:
    clip_eps: float | None = 0.2  #: ratio clipped to [1−ε, 1+ε]
    clip_eps_low: float | None = None  #: overrides clip_eps below
    clip_eps_high: float | None = None  #: overrides clip_eps above (DAPO's clip-higher)
    kl_coef: float = 0.0  #: weight of the k3 KL to π_ref; > 0 makes the loss read logp_ref_tok
    loss_agg_mode: str = "token-mean"  #: see aggregate()
    norm_len: int | None = (
        None  #: the constant of seq-mean-token-sum-norm (unset: sampler.max_new_tokens)
    )

    def __post_init__(self):
        _agg_mode(self.loss_agg_mode)
        _norm_len(self.norm_len)
        if not self.kl_coef >= 0:
            raise ValueError(
                f"algorithm.loss_args.kl_coef={self.kl_coef!r}; allowed: a number >= 0"
            )


@register_loss(
    "grpo",
    GRPOOptions,
    needs=lambda o: {"logp_old_tok", "advantages"} | ({"logp_ref_tok"} if o.kl_coef > 0 else set()),
)
def grpo_loss(
    logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: GRPOOptions
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: PPO's clipped surrogate per token with a sequence-level advantage, optional k3 KL.

    ``ρ = exp(logp − logp_old_tok)``, per token ``−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)
    + kl_coef·k3``, ``k3 = exp(ref − logp) − (ref − logp) − 1`` (unbiased, non-negative KL
    estimate), reduced by :func:`aggregate`. ``logp_ref_tok`` is read iff ``kl_coef > 0``;
    the ``kl`` metric is reported whenever the batch holds it.

    Example (B=1, T=1, A=1, ε=0.2): logp − logp_old_tok = log 1.5 → ρ = 1.5 is clipped to 1.2,
    loss = −1.2 with zero gradient, clip_frac = 1.
    """
    x, m, _ = _prepare(logp, mask)
    low, high = _clip_range(options, 0.2, 0.2)
    kl_coef = float(options.kl_coef)
    log_ratio = x - _const(batch, "logp_old_tok", x, m)
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    adv = _const(batch, "advantages", x).unsqueeze(-1)  # [B, 1]
    per_token, clipped = _clipped_surrogate(ratio, adv, low, high)
    metrics: dict[str, Tensor | float] = {}
    if "logp_ref_tok" in batch:
        d = (_const(batch, "logp_ref_tok", x, m) - x).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        k3 = torch.exp(d) - d - 1  # [B, T]
        metrics["kl"] = aggregate(k3, m, "token-mean")
        if kl_coef > 0:
            per_token = per_token + kl_coef * k3
    loss = aggregate(per_token, m, options.loss_agg_mode, options.norm_len)
    return loss, _floats(
        loss=loss,
        clip_frac=aggregate(clipped.to(x.dtype), m, "token-mean"),
        ratio_mean=aggregate(ratio, m, "token-mean"),
        **metrics,
    )


@dataclass(frozen=True)
class GSPOOptions:
    clip_eps: float | None = None  #: both sides at once (else the two below)
    clip_eps_low: float | None = 3e-4  #: sequence ratio clipped below at 1 − this
    clip_eps_high: float | None = 4e-4  #: and above at 1 + this


@register_loss("gspo", GSPOOptions, needs=lambda o: {"logp_old_tok", "advantages"})
def gspo_loss(
    logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: GSPOOptions
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: the clipped surrogate on a sequence-level, length-normalised ratio. No KL.

    ``s = exp(mean over valid tokens of (logp − logp_old_tok))`` (gradient flows through s),
    per sequence ``−min(sA, clip(s, 1−ε_low, 1+ε_high)A)``, ``L`` = mean over the B sequences.
    The geometric mean keeps s near 1 whatever the length, hence the paper's narrow range.

    Example (B=1, T=2, A=1): log-ratios [0.001, 0.001] → s = e^0.001 ≈ 1.001, clipped to
    1.0004: loss = −1.0004 with zero gradient.
    """
    x, m, length = _prepare(logp, mask)
    low, high = _clip_range(options, 3e-4, 4e-4)
    mean_log_ratio = (x - _const(batch, "logp_old_tok", x, m)).sum(-1) / length  # [B]
    ratio = torch.exp(mean_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    per_seq, clipped = _clipped_surrogate(ratio, _const(batch, "advantages", x), low, high)
    loss = per_seq.mean()
    return loss, _floats(loss=loss, clip_frac=clipped.to(x.dtype).mean(), ratio_mean=ratio.mean())


@dataclass(frozen=True)
class SFTOptions:
    reward_threshold: float = 0.5  #: a trajectory is a target iff its reward exceeds this
    loss_agg_mode: str = "token-mean"  #: see aggregate()
    norm_len: int | None = (
        None  #: the constant of seq-mean-token-sum-norm (unset: sampler.max_new_tokens)
    )

    def __post_init__(self):
        _agg_mode(self.loss_agg_mode)
        _norm_len(self.norm_len)


@register_loss("sft", SFTOptions, needs=lambda o: {"reward"})
def sft_loss(
    logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor], options: SFTOptions
) -> tuple[Tensor, dict[str, float]]:
    """LoRA-SFT distillation: NLL ``−logp`` on the tokens of rewarded trajectories only.

    A trajectory is a target iff ``reward > reward_threshold``; the others are dropped before
    :func:`aggregate` (so "mean over sequences" means over the targets). With no target in the
    batch the loss is a graph-connected 0, so the optimizer step is a harmless no-op.

    Example: logp=[[-1, -3], [-7, -7]], mask all 1, reward=[1, 0] → loss = 2 (row 2 ignored).
    """
    x, m, _ = _prepare(logp, mask)
    used = _const(batch, "reward", x) > float(options.reward_threshold)  # [B]
    n_used = int(used.sum())
    if n_used == 0:
        loss = x.sum() * 0
    else:
        loss = aggregate(-x[used], m[used], options.loss_agg_mode, options.norm_len)
    return loss, _floats(loss=loss, n_used=n_used, used_frac=n_used / max(len(used), 1))
