"""disa.losses against independent float64 references written as plain Python loops.

Padding positions hold GARBAGE (1e6) throughout: a loss that let them in would be off by
orders of magnitude (or overflow), so every value check doubles as a masking check.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from disa.losses import (
    AGG_MODES,
    BATCH_FIELDS,
    LOSSES,
    aggregate,
    get_loss,
    group_normalize,
    sequence_logprob,
)


def run_loss(name, logp, mask, batch, loss_args):
    """A registered loss on ``batch`` with its options built from ``loss_args`` as training
    builds them (a ``beta`` entry plays the run's β)."""
    spec, args = get_loss(name), dict(loss_args)
    return spec(logp, mask, batch, spec.make_options(args, beta=args.pop("beta", None)))


GARBAGE = 1e6
F64 = torch.float64


def padded(
    rows: list[list[float]], T: int, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` float64 tensor with ``rows`` left-aligned and GARBAGE after them, and its mask."""
    values = [[*r, *[GARBAGE] * (T - len(r))] for r in rows]
    mask = [[True] * len(r) + [False] * (T - len(r)) for r in rows]
    return torch.tensor(values, dtype=F64, requires_grad=grad), torch.tensor(mask)


def random_rows(
    lengths: list[int], seed: int, lo: float = -3.0, hi: float = 0.0
) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(lo, hi) for _ in range(n)] for n in lengths]


def t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def check_metrics(metrics: dict) -> None:
    assert metrics and all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics


def ref_aggregate(rows: list[list[float]], mode: str, norm_len: int) -> float:
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / n if n else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    return sum(sum(r) / norm_len for r in rows) / len(rows)


def ref_group_normalize(
    rewards: list[float], groups: list[int], scale: str, eps: float = 1e-6
) -> list[float]:
    def std(xs: list[float]) -> float:
        if len(xs) < 2:
            return 0.0
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        centred = r - sum(members) / len(members)
        out.append(
            centred / ({"group": std(members), "batch": std(rewards)}.get(scale, 0.0) + eps)
            if scale != "none"
            else centred
        )
    return out


# -- aggregate, group_normalize, sequence_logprob -------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("norm_len", [6, 9])
def test_aggregate_modes_ignore_padding(mode, norm_len):
    rows = random_rows([3, 1, 0, 6, 2], seed=1, lo=-2.0, hi=2.0)
    values, mask = padded(rows, T=6, grad=True)
    out = aggregate(values, mask, mode, norm_len=norm_len)
    expected = ref_aggregate(rows, mode, norm_len=norm_len)
    assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert aggregate(values, mask.float(), mode, norm_len=norm_len).item() == pytest.approx(
        expected, rel=1e-12
    )
    out.backward()
    assert torch.all(values.grad[~mask] == 0) and torch.isfinite(values.grad).all()


def test_dr_grpo_normaliser_is_a_constant_not_the_padded_width():
    # Dr. GRPO divides by a constant; the padded width of the batch at hand would make the same
    # tokens weigh 1/2 here and 1/4 once the batch holds a longer completion
    v, m = torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[1, 1]])
    wide_v, wide_m = torch.nn.functional.pad(v, (0, 2)), torch.nn.functional.pad(m, (0, 2))
    mode = "seq-mean-token-sum-norm"
    assert (
        aggregate(v, m, mode, norm_len=8).item()
        == aggregate(wide_v, wide_m, mode, norm_len=8).item()
        == 3 / 8
    )
    with pytest.raises(ValueError, match="needs norm_len .*sampler.max_new_tokens"):
        aggregate(v, m, mode)
    assert aggregate(v, m, "token-mean").item() == 1.5  # the other modes need no constant


@pytest.mark.parametrize("extra", [0, 1, 5])
def test_grpo_sum_norm_loss_does_not_depend_on_padding(extra):
    # the options as a run builds them (norm_len from the sampler's max_new_tokens): padding
    # the rollout's completions wider leaves loss and gradient unchanged
    rows = random_rows([4, 1, 3], seed=21)
    logp, mask = padded(rows, T=4, grad=True)
    old, _ = padded(random_rows([4, 1, 3], seed=22), T=4)
    batch = {"logp_old_tok": old, "advantages": t([0.9, -0.4, 0.3])}
    options = get_loss("grpo").make_options(
        {"loss_agg_mode": "seq-mean-token-sum-norm"}, max_new_tokens=8
    )
    assert options.norm_len == 8
    base, _ = get_loss("grpo")(logp, mask, batch, options)
    base.backward()
    wide = torch.nn.functional.pad(logp.detach(), (0, extra), value=-3.0).requires_grad_(True)
    wide_batch = {
        "logp_old_tok": torch.nn.functional.pad(old, (0, extra), value=-1.0),
        "advantages": batch["advantages"],
    }
    padded_loss, _ = get_loss("grpo")(
        wide, torch.nn.functional.pad(mask, (0, extra)), wide_batch, options
    )
    padded_loss.backward()
    assert padded_loss.item() == base.item()
    assert torch.equal(wide.grad[:, :4], logp.grad) and torch.all(wide.grad[:, 4:] == 0)


def test_norm_len_defaults_to_max_new_tokens_unless_set():
    grpo, sft = get_loss("grpo"), get_loss("sft")
    assert grpo.make_options({}, max_new_tokens=12).norm_len == 12
    assert grpo.make_options({"norm_len": 5}, max_new_tokens=12).norm_len == 5  # set: kept
    assert grpo.make_options({"norm_len": None}, max_new_tokens=12).norm_len == 12
    assert sft.make_options({}, max_new_tokens=7).norm_len == 7
    assert get_loss("disa").make_options({}, beta=1.0, max_new_tokens=7) == get_loss(
        "disa"
    ).make_options({}, beta=1.0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(
            ValueError, match=r"loss_args.norm_len=.*allowed: an integer >= 1, or null"
        ):
            grpo.make_options({"norm_len": bad})


def test_aggregate_all_empty_is_zero_not_nan():
    values, mask = padded([[], []], T=3)
    for mode in AGG_MODES:
        assert aggregate(values, mask, mode, norm_len=3).item() == 0.0


def test_aggregate_unknown_mode():
    values, mask = padded([[1.0]], T=1)
    with pytest.raises(ValueError, match="unknown loss_agg_mode") as err:
        aggregate(values, mask, "seq-sum")
    assert all(m in str(err.value) for m in AGG_MODES)


def test_group_normalize_by_hand():
    rewards, groups = [1.0, 0.0, 1.0], [0, 0, 0]
    # mean 2/3, unbiased std = sqrt(((1/3)² + (2/3)² + (1/3)²) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected = [(1 / 3) / (s + 1e-6), (-2 / 3) / (s + 1e-6), (1 / 3) / (s + 1e-6)]
    out = group_normalize(t(rewards), torch.tensor(groups))
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_normalize_scales(scale):
    # unsorted, non-contiguous ids; an all-equal group (0.1 whose mean is inexact in floats);
    # a singleton group
    rewards = [1.0, 0.1, 0.0, 2.5, 0.1, 1.0, 0.1, 4.0, -1.0]
    groups = [7, 3, 7, 11, 3, 7, 3, 5, 5]
    out = group_normalize(t(rewards), torch.tensor(groups), scale)
    expected = ref_group_normalize(rewards, groups, scale)
    for i, g in enumerate(groups):
        if g in (3, 11):  # all-equal and singleton groups: exactly 0, whatever the scale
            assert out[i].item() == 0.0
        else:
            assert out[i].item() == pytest.approx(expected[i], rel=1e-10)
    assert torch.isfinite(out).all()


def test_group_normalize_float32_all_equal_exact_zero():
    out = group_normalize(torch.full((3,), 0.1), torch.zeros(3, dtype=torch.long))
    assert torch.equal(out, torch.zeros(3))


def test_group_normalize_batch_scale_with_one_and_two_rewards():
    # one reward: the batch std is undefined, the advantage is 0 (never NaN)
    assert group_normalize(t([3.0]), torch.tensor([0]), "batch").tolist() == [0.0]
    # two rewards in one group: centred ±0.5, batch std = sqrt(0.5) (n − 1 = 1)
    out = group_normalize(t([1.0, 0.0]), torch.tensor([0, 0]), "batch")
    s = math.sqrt(0.5)
    assert out.tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)], rel=1e-12)


def test_group_normalize_unknown_scale():
    with pytest.raises(ValueError, match="group"):
        group_normalize(t([1.0]), torch.tensor([0]), "rank")


def test_sequence_logprob():
    rows = random_rows([2, 0, 4], seed=2)
    logp, mask = padded(rows, T=4)
    assert sequence_logprob(logp, mask).tolist() == pytest.approx([sum(r) for r in rows], rel=1e-12)


# -- registry ------------------------------------------------------------------------------


def test_registry_and_unknown_loss():
    assert set(LOSSES) == {"disa", "flowrl", "grpo", "gspo", "sft"}
    assert get_loss("grpo") is LOSSES["grpo"]
    with pytest.raises(ValueError, match="algorithm.loss") as err:
        get_loss("ppo")
    assert str(sorted(LOSSES)) in str(err.value)


# -- DISA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length_normalize", [False, True])
def test_disa_value_and_gradients(length_normalize):
    rows = random_rows([3, 1, 5, 0], seed=3)
    logp, mask = padded(rows, T=5, grad=True)
    log_z_hat, logp_ref = t([0.3, -1.2, 2.0, 0.7], grad=True), t([-4.0, -0.5, -9.0, 0.0], grad=True)
    reward, beta = [1.0, 0.0, 1.0, 0.0], 2.5
    loss, metrics = run_loss(
        "disa",
        logp,
        mask,
        {"log_z_hat": log_z_hat, "logp_ref_seq": logp_ref, "reward": t(reward)},
        {"beta": beta, "length_normalize": length_normalize},
    )
    deltas = []
    for i, r in enumerate(rows):
        log_ratio = sum(r) - logp_ref[i].item()
        if length_normalize:
            log_ratio /= max(len(r), 1)
        deltas.append(log_z_hat[i].item() + log_ratio - beta * reward[i])
    B = len(rows)
    assert loss.item() == pytest.approx(sum(d * d for d in deltas) / B, rel=1e-12)
    assert metrics["delta_mean"] == pytest.approx(sum(deltas) / B, rel=1e-12)
    assert metrics["delta_abs_mean"] == pytest.approx(sum(abs(d) for d in deltas) / B, rel=1e-12)
    check_metrics(metrics)

    loss.backward()
    assert log_z_hat.grad is None and logp_ref.grad is None
    for i, r in enumerate(rows):
        scale = max(len(r), 1) if length_normalize else 1
        for j in range(5):
            expected = 2 * deltas[i] / (B * scale) if j < len(r) else 0.0
            assert logp.grad[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_disa_needs_beta_and_reads_omegaconf():
    logp, mask = padded([[-1.0, -2.0]], T=2, grad=True)
    batch = {"log_z_hat": t([0.5]), "logp_ref_seq": t([-2.5]), "reward": t([1.0])}
    with pytest.raises(ValueError, match="beta"):
        run_loss("disa", logp, mask, batch, {})
    loss, _ = run_loss(
        "disa", logp, mask, batch, OmegaConf.create({"beta": 1.0, "length_normalize": False})
    )
    assert loss.item() == pytest.approx(1.0)  # the docstring example: δ = −1


# -- GRPO ----------------------------------------------------------------------------------


def test_grpo_clipping_both_sides():
    # (ratio, advantage) per sequence; ε = 0.2
    cases = [(1.5, 1.0), (0.5, 1.0), (1.5, -1.0), (0.5, -1.0)]
    lengths = [2, 3, 1, 2]
    old_rows = random_rows(lengths, seed=4)
    logp_rows = [[o + math.log(rho) for o in r] for r, (rho, _) in zip(old_rows, cases)]
    logp, mask = padded(logp_rows, T=3, grad=True)
    logp_old, _ = padded(old_rows, T=3)
    adv = t([a for _, a in cases])
    loss, metrics = run_loss("grpo", logp, mask, {"logp_old_tok": logp_old, "advantages": adv}, {})
    # A>0: ρ=1.5 clipped (−1.2), ρ=0.5 not (−0.5); A<0: ρ=1.5 not (1.5), ρ=0.5 clipped (0.8)
    per_token = {0: -1.2, 1: -0.5, 2: 1.5, 3: 0.8}
    clipped = {0: True, 1: False, 2: False, 3: True}
    n = sum(lengths)
    assert loss.item() == pytest.approx(
        sum(per_token[i] * lengths[i] for i in range(4)) / n, rel=1e-12
    )
    assert metrics["clip_frac"] == pytest.approx((lengths[0] + lengths[3]) / n)
    assert "kl" not in metrics
    check_metrics(metrics)
    loss.backward()
    for i, (rho, a) in enumerate(cases):
        for j in range(3):
            if j >= lengths[i] or clipped[i]:
                assert logp.grad[i, j].item() == 0.0
            else:  # d(−Aρ)/dlogp = −Aρ, over the n valid tokens
                assert logp.grad[i, j].item() == pytest.approx(-a * rho / n, rel=1e-12)


def test_grpo_asymmetric_clip_range():
    logp, mask = padded([[math.log(1.25)]], T=1, grad=True)
    batch = {"logp_old_tok": t([[0.0]]), "advantages": t([1.0])}
    loss, m = run_loss("grpo", logp, mask, batch, {"clip_eps": 0.2})
    assert (loss.item(), m["clip_frac"]) == (pytest.approx(-1.2), 1.0)
    loss, m = run_loss("grpo", logp, mask, batch, {"clip_eps": 0.2, "clip_eps_high": 0.28})
    assert (loss.item(), m["clip_frac"]) == (pytest.approx(-1.25), 0.0)
    loss, m = run_loss("grpo", logp, mask, batch, {"clip_eps": 0.1})  # ρ = 1.25 > 1.1
    assert (loss.item(), m["clip_frac"]) == (pytest.approx(-1.1), 1.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_kl_and_agg_modes(mode):
    lengths = [4, 1, 3, 0]
    logp_rows, old_rows, ref_rows = (random_rows(lengths, seed=s) for s in (5, 6, 7))
    logp, mask = padded(logp_rows, T=4, grad=True)
    (logp_old, _), (logp_ref, _) = padded(old_rows, T=4), padded(ref_rows, T=4)
    adv = [0.7, -1.3, 0.2, 1.0]
    kl_coef, eps = 0.05, 0.2
    cfg = {"kl_coef": kl_coef, "loss_agg_mode": mode, "norm_len": 6}
    loss, metrics = run_loss(
        "grpo",
        logp,
        mask,
        {"logp_old_tok": logp_old, "advantages": t(adv), "logp_ref_tok": logp_ref},
        cfg,
    )
    per_token, k3s = [], []
    for lp, old, ref, a in zip(logp_rows, old_rows, ref_rows, adv):
        row = []
        for x, o, r in zip(lp, old, ref):
            rho = math.exp(x - o)
            k3 = math.exp(r - x) - (r - x) - 1
            k3s.append(k3)
            row.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) + kl_coef * k3)
        per_token.append(row)
    assert loss.item() == pytest.approx(ref_aggregate(per_token, mode, norm_len=6), rel=1e-12)
    assert metrics["kl"] == pytest.approx(sum(k3s) / len(k3s), rel=1e-12)
    check_metrics(metrics)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.all(logp.grad[~mask] == 0)


def test_grpo_kl_needs_reference():
    logp, mask = padded([[-1.0]], T=1, grad=True)
    with pytest.raises(KeyError, match="logp_ref_tok"):
        run_loss(
            "grpo",
            logp,
            mask,
            {"logp_old_tok": t([[-1.0]]), "advantages": t([1.0])},
            {"kl_coef": 0.1},
        )


# -- GSPO ----------------------------------------------------------------------------------


def test_gspo_sequence_ratio_and_narrow_clip():
    # mean log-ratios: 1e-4 (inside [1−3e-4, 1+4e-4]), 1e-3 (above), −1e-3 (below), and a
    # mixed sequence whose token log-ratios differ but average to 2e-4
    token_lr = [[1e-4, 1e-4], [1e-3], [-1e-3, -1e-3, -1e-3], [5e-4, -1e-4]]
    adv = [1.0, 1.0, -1.0, -0.5]
    old_rows = random_rows([len(r) for r in token_lr], seed=8)
    logp, mask = padded(
        [[o + d for o, d in zip(old, lr)] for old, lr in zip(old_rows, token_lr)], T=3, grad=True
    )
    logp_old, _ = padded(old_rows, T=3)
    loss, metrics = run_loss(
        "gspo", logp, mask, {"logp_old_tok": logp_old, "advantages": t(adv)}, {}
    )
    lo, hi, B = 1 - 3e-4, 1 + 4e-4, len(adv)
    s = [math.exp(sum(lr) / len(lr)) for lr in token_lr]
    per_seq = [-min(si * a, min(max(si, lo), hi) * a) for si, a in zip(s, adv)]
    assert loss.item() == pytest.approx(sum(per_seq) / B, rel=1e-12)
    assert per_seq[1] == pytest.approx(-hi) and per_seq[2] == pytest.approx(lo)  # clipped values
    assert metrics["clip_frac"] == pytest.approx(0.5)
    check_metrics(metrics)
    loss.backward()
    clipped = [False, True, True, False]
    for i, lr in enumerate(token_lr):
        for j in range(3):
            # d(−A·s)/dlogp_j = −A·s/|o| through the geometric mean
            expected = 0.0 if j >= len(lr) or clipped[i] else -adv[i] * s[i] / (len(lr) * B)
            assert logp.grad[i, j].item() == pytest.approx(expected, rel=1e-10, abs=0)


# -- FlowRL --------------------------------------------------------------------------------


def test_flowrl_value_weights_and_gradients():
    lengths = [3, 1, 2, 4, 2, 1]
    rows = random_rows(lengths, seed=9)
    logp, mask = padded(rows, T=4, grad=True)
    # Σ(logp − logp_old)
    log_w = [
        math.log(2.0),
        math.log(0.5),
        math.log(1.1),
        0.0,
        math.log(0.9),
        30.0,
    ]
    logp_old = t([sum(r) - lw for r, lw in zip(rows, log_w)], grad=True)
    logp_ref = t([-5.0, -1.0, -2.5, -7.0, -3.0, -0.2], grad=True)
    log_z = t([0.4, -0.1, 0.9, 0.0, 0.2, -0.6], grad=True)
    reward = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # group 1 all equal → r̂ = 0 there
    groups = [0, 0, 0, 1, 1, 1]
    batch = {
        "log_z": log_z,
        "logp_ref_seq": logp_ref,
        "logp_old_seq": logp_old,
        "reward": t(reward),
        "group_ids": torch.tensor(groups),
    }
    loss, metrics = run_loss("flowrl", logp, mask, batch, {"beta": 99.0})  # β is DISA's, not β_f
    beta_f, B = 15.0, len(rows)
    m, s = 2 / 3, math.sqrt(1 / 3)
    r_hat = [(reward[i] - m) / (s + 1e-6) for i in range(3)] + [0.0, 0.0, 0.0]
    w = [min(max(math.exp(lw), 0.8), 1.2) for lw in log_w]
    assert w == pytest.approx([1.2, 0.8, 1.1, 1.0, 0.9, 1.2])
    deltas = [
        log_z[i].item() + (sum(r) - logp_ref[i].item()) / len(r) - beta_f * r_hat[i]
        for i, r in enumerate(rows)
    ]
    assert loss.item() == pytest.approx(sum(wi * d * d for wi, d in zip(w, deltas)) / B, rel=1e-12)
    assert metrics["clip_frac"] == pytest.approx(3 / 6)
    assert metrics["weight_mean"] == pytest.approx(sum(w) / B)
    check_metrics(metrics)

    loss.backward()
    assert logp_ref.grad is None and logp_old.grad is None
    assert log_z.grad.tolist() == pytest.approx(
        [2 * wi * d / B for wi, d in zip(w, deltas)], rel=1e-12
    )
    for i, r in enumerate(rows):  # w is detached: only δ carries the gradient, 1/|o| per token
        for j in range(4):
            expected = 2 * w[i] * deltas[i] / (B * len(r)) if j < len(r) else 0.0
            assert logp.grad[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_flowrl_separate_clip_bounds():
    logp, mask = padded([[0.0], [0.0]], T=1, grad=True)
    batch = {
        "log_z": t([1.0, 1.0]),
        "logp_ref_seq": t([0.0, 0.0]),
        "logp_old_seq": t([-math.log(3.0), math.log(3.0)]),
        "reward": t([0.0, 0.0]),
        "group_ids": torch.tensor([0, 1]),
    }
    _, metrics = run_loss(
        "flowrl", logp, mask, batch, {"clip_eps": 0.2, "clip_eps_low": 0.5, "clip_eps_high": 1.0}
    )
    assert metrics["weight_mean"] == pytest.approx((2.0 + 0.5) / 2)  # w = 3 → 2, w = 1/3 → 0.5


def test_flowrl_on_policy_weights_at_a_zero_clip_range_are_not_clipped():
    # ε = 0: the clip range is the single point 1, and on-policy weights are exactly 1 there.
    # A weight counts as clipped only when clipping changed it.
    rows = random_rows([2, 3], seed=11)
    logp, mask = padded(rows, T=3, grad=True)
    on_policy = t([sum(r) for r in rows])
    batch = {
        "log_z": t([0.0, 0.0]),
        "logp_ref_seq": t([-1.0, -1.0]),
        "logp_old_seq": on_policy,
        "reward": t([1.0, 0.0]),
        "group_ids": torch.tensor([0, 0]),
    }
    _, metrics = run_loss("flowrl", logp, mask, batch, {"clip_eps": 0.0})
    assert metrics["clip_frac"] == 0.0 and metrics["weight_mean"] == 1.0
    batch["logp_old_seq"] = on_policy + t([0.5, -0.5])  # one weight below 1, one above
    _, metrics = run_loss("flowrl", logp, mask, batch, {"clip_eps": 0.0})
    assert metrics["clip_frac"] == 1.0


# -- SFT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
def test_sft_ignores_unrewarded(mode):
    lengths = [3, 2, 4, 1]
    reward = [1.0, 0.0, 0.7, 0.5]  # 0.5 is not > 0.5: only rows 0 and 2 are targets
    rows = random_rows(lengths, seed=10)
    cfg = {"loss_agg_mode": mode, "norm_len": 5}
    logp, mask = padded(rows, T=4, grad=True)
    loss, metrics = run_loss("sft", logp, mask, {"reward": t(reward)}, cfg)
    used = [rows[0], rows[2]]
    assert loss.item() == pytest.approx(
        ref_aggregate([[-x for x in r] for r in used], mode, norm_len=5), rel=1e-12
    )
    assert metrics["n_used"] == 2.0
    check_metrics(metrics)
    loss.backward()
    assert torch.all(logp.grad[[1, 3]] == 0) and torch.all(logp.grad[[0, 2]][mask[[0, 2]]] != 0)

    other = [r if reward[i] > 0.5 else [x - 50.0 for x in r] for i, r in enumerate(rows)]
    logp2, _ = padded(other, T=4)
    assert run_loss("sft", logp2, mask, {"reward": t(reward)}, cfg)[0].item() == loss.item()


def test_sft_no_target_is_graph_connected_zero():
    logp, mask = padded(random_rows([2, 3], seed=11), T=3, grad=True)
    loss, metrics = run_loss("sft", logp, mask, {"reward": t([0.0, 0.2])}, {})
    assert loss.item() == 0.0 and loss.requires_grad
    assert metrics["n_used"] == 0.0
    check_metrics(metrics)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


# -- the contract ------------------------------------------------------------------------------


def test_every_loss_declares_fields_of_the_schema_and_every_algorithm_config_builds_its_options(
    repo,
):
    from omegaconf import OmegaConf

    for path in sorted((repo / "conf" / "algorithm").glob("*.yaml")):
        alg = OmegaConf.load(path)
        spec = get_loss(alg.loss)
        options = spec.make_options(OmegaConf.to_container(alg.loss_args), beta=2.0)
        assert spec.needs(options) <= set(BATCH_FIELDS), path.name
    # β reaches only the losses that take it
    assert get_loss("disa").make_options({}, beta=3.0).beta == 3.0


def test_a_batch_without_a_needed_field_or_with_the_wrong_shape_is_refused():
    logp, mask = padded([[-1.0, -2.0], [-1.0]], T=2, grad=True)
    batch = {"log_z_hat": t([0.5, 0.1]), "logp_ref_seq": t([-2.5, -1.0]), "reward": t([1.0, 0.0])}
    with pytest.raises(
        KeyError,
        match=r"the loss needs batch fields \['log_z_hat'\]; got \['logp_ref_seq', 'reward'\]",
    ):
        run_loss(
            "disa", logp, mask, {k: v for k, v in batch.items() if k != "log_z_hat"}, {"beta": 1.0}
        )
    # the per-token reference where the per-sequence one belongs: named, with the schema's shape
    with pytest.raises(ValueError, match=r"logp_ref_seq.*\[B\]"):
        run_loss(
            "disa",
            logp,
            mask,
            batch | {"logp_ref_seq": t([[-2.5, 0.0], [-1.0, 0.0]])},
            {"beta": 1.0},
        )


def test_options_refuse_unknown_keys_and_a_beta_of_their_own():
    with pytest.raises(ValueError, match=r"clip_epsilon.*allowed: \['clip_eps'"):
        get_loss("grpo").make_options({"clip_epsilon": 0.2})
    with pytest.raises(ValueError, match="top-level `beta`"):
        get_loss("disa").make_options({"beta": 1.0}, beta=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        get_loss("sft").make_options({"loss_agg_mode": "mean"})


def test_options_messages_name_the_key_and_the_allowed_ones():
    # DISA declares β, but β is not a loss_args key: it is neither allowed nor hinted at
    # unless the user gave it
    with pytest.raises(ValueError) as e:
        get_loss("disa").make_options({"temperature": 1.0}, beta=1.0)
    assert str(e.value) == (
        "algorithm.loss_args has ['temperature'], which the 'disa' loss does not take; "
        "allowed: ['length_normalize']"
    )
    with pytest.raises(ValueError) as e:
        get_loss("disa").make_options({"beta": 2.0}, beta=1.0)
    assert str(e.value) == (
        "algorithm.loss_args has ['beta'], which the 'disa' loss does not take; "
        "allowed: ['length_normalize'] (β is the top-level `beta`)"
    )
    with pytest.raises(
        ValueError, match=r"^the disa loss needs β \(the top-level `beta` setting\)$"
    ):
        get_loss("disa").make_options({})
    with pytest.raises(
        ValueError, match=r"^algorithm.loss_args.kl_coef=-0.1; allowed: a number >= 0$"
    ):
        get_loss("grpo").make_options({"kl_coef": -0.1})


def test_a_registered_loss_is_found_and_checked_like_the_built_ins():
    from dataclasses import dataclass

    from disa.losses import LOSSES, register_loss

    @dataclass(frozen=True)
    class Opts:
        scale: float = 2.0

    @register_loss(
        "test_scaled_sum",
        Opts,
        needs=lambda o: {"reward"} | ({"advantages"} if o.scale < 0 else set()),
    )
    def scaled_sum(logp, mask, batch, options):
        return options.scale * sequence_logprob(logp, mask).sum(), {}

    try:
        spec = get_loss("test_scaled_sum")
        assert (spec.name, spec.fn, spec.options) == ("test_scaled_sum", scaled_sum, Opts)
        assert spec.needs(Opts()) == frozenset({"reward"}) and spec.needs(Opts(-1.0)) == frozenset(
            {"reward", "advantages"}
        )
        logp, mask = padded([[-1.0, -2.0], [-0.5]], T=2)
        loss, _ = spec(logp, mask, {"reward": t([1.0, 0.0])}, spec.make_options({"scale": 3.0}))
        assert loss.item() == pytest.approx(3.0 * -3.5)
        with pytest.raises(KeyError, match="advantages"):
            spec(logp, mask, {"reward": t([1.0, 0.0])}, spec.make_options({"scale": -1.0}))
    finally:
        LOSSES.pop("test_scaled_sum", None)


@pytest.mark.parametrize("name", ["disa", "flowrl", "grpo", "gspo", "sft"])
def test_losses_compute_in_float32_at_least_and_in_the_policy_dtype(name):
    # bf16 log-probs are promoted to float32 before any nonlinearity, and float64 batch
    # fields follow the policy's compute dtype rather than widening the loss
    rows = random_rows([2, 3], seed=12)
    B = len(rows)
    batch = {
        "reward": t([1.0, 0.0]),
        "log_z_hat": t([0.3, 0.1]),
        "log_z": t([0.2, -0.1]),
        "logp_ref_seq": t([-2.0, -3.0]),
        "logp_old_seq": t([sum(r) for r in rows]),
        "logp_old_tok": padded(rows, T=3)[0],
        "advantages": t([0.5, -0.5]),
        "group_ids": torch.tensor([0, 0]),
    }
    logp, mask = padded(rows, T=3)
    args = {"beta": 1.0} if name == "disa" else {}
    for dtype in (torch.bfloat16, torch.float32):
        with warnings.catch_warnings():  # metrics are detached before float(): no autograd warning
            warnings.simplefilter("error")
            loss, _ = run_loss(name, logp.to(dtype).requires_grad_(), mask, batch, args)
        assert loss.dtype == torch.float32, (name, dtype)
        assert torch.isfinite(loss)
    want, _ = run_loss(name, logp, mask, batch, args)  # float64 throughout
    got, _ = run_loss(
        name,
        logp.float(),
        mask,
        {k: v.float() if v.is_floating_point() else v for k, v in batch.items()},
        args,
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6) and B == 2


def test_group_normalize_integer_rewards_equal_float_rewards():
    rewards, groups = [1, 0, 1, 1, 0, 0], torch.tensor([0, 0, 0, 1, 1, 1])
    for scale in ("group", "batch", "none"):
        got = group_normalize(torch.tensor(rewards), groups, scale)
        assert got.is_floating_point(), scale
        assert got.tolist() == pytest.approx(
            group_normalize(torch.tensor(rewards, dtype=torch.float32), groups, scale).tolist()
        ), scale


def test_which_losses_read_the_reference():
    grpo = get_loss("grpo")
    assert not grpo.reads_reference(grpo.make_options({"kl_coef": 0.0}))
    assert grpo.reads_reference(grpo.make_options({"kl_coef": 0.05}))
    assert get_loss("flowrl").reads_reference(get_loss("flowrl").make_options({}))
    # offline: from the cache
    assert get_loss("disa").reads_reference(get_loss("disa").make_options({}, beta=1.0))
    assert not get_loss("gspo").reads_reference(get_loss("gspo").make_options({}))
