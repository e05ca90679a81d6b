"""Training plumbing: gradients reach exactly what they should, every algorithm trains."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import tiny_llama

from disa.losses import get_loss
from disa.sampling import SamplerSettings
from disa.sampling.hf import HFSampler
from disa.scoring import pack
from disa.training.module import PolicyModule
from disa.training.online import LogZHead, OnlinePolicyModule


def _batch(char_tok):
    prompts = [char_tok("ab").input_ids, char_tok("c").input_ids]
    comps = [[4, 5, char_tok.eos_token_id], [6, char_tok.eos_token_id]]
    b = pack(prompts, comps, char_tok.pad_token_id)
    return {
        "input_ids": b.input_ids,
        "attention_mask": b.attention_mask,
        "position_ids": b.position_ids,
        "completion_mask": b.completion_mask,
    }


def _online_module(policy, ref, char_tok, task, prompts, algorithm, options=None, **kwargs):
    """An online module on the character tokenizer (3-token completions, SGD at 0.1, one
    update per rollout), with a stand-in trainer: ``global_step`` reads nothing else here."""
    loss = get_loss(algorithm)
    kwargs = {"group_size": 4, "minibatch_size": 8} | kwargs
    module = OnlinePolicyModule(
        policy,
        ref,
        char_tok,
        task,
        prompts,
        HFSampler(64),
        SamplerSettings(max_new_tokens=3),
        loss,
        loss.make_options(options or {}),
        lambda p: torch.optim.SGD(p, lr=0.1),
        updates_per_rollout=1,
        **kwargs,
    )
    module.trainer = type("Tr", (), {"max_steps": 10})()
    module._trainer = None
    return module


def test_disa_step_grad_reaches_policy_not_anchor(char_tok):
    policy = tiny_llama(len(char_tok))
    disa = get_loss("disa")
    module = PolicyModule(
        policy.train(), disa, disa.make_options({}, beta=2.0), lambda p: torch.optim.SGD(p, lr=0.1)
    )
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    module.optimizers = lambda: module.configure_optimizers()  # read for the logged learning rate
    batch = _batch(char_tok)
    batch["log_z_hat"] = torch.tensor([0.5, 1.0], requires_grad=True)
    batch["logp_ref_seq"] = torch.tensor([-3.0, -2.0], requires_grad=True)
    batch["reward"] = torch.tensor([1.0, 0.0])
    loss = module.training_step(batch, 0)
    loss.backward()
    assert batch["log_z_hat"].grad is None and batch["logp_ref_seq"].grad is None
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_flowrl_grad_reaches_log_z_head_not_reference(char_tok):
    policy, ref = tiny_llama(len(char_tok), seed=0), tiny_llama(len(char_tok), seed=1)
    head = LogZHead(policy.config.hidden_size, num_layers=3, dropout=0.0)
    task = type("T", (), {"rewards": lambda self, rows, texts: [float("a" in t) for t in texts]})()
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["ab", "c"]})
    module = _online_module(
        policy,
        ref,
        char_tok,
        task,
        prompts,
        "flowrl",
        {"beta_f": 15.0, "clip_eps": 0.2},
        log_z_head=head,
    )
    roll = module.rollout([0, 1])
    assert "logp_ref_seq" in roll and not roll["logp_ref_seq"].requires_grad
    logp, mask, batch = module.loss_inputs(roll, torch.arange(8))
    # exactly the fields the loss reads
    assert set(batch) == set(get_loss("flowrl").needs(module.options))
    loss, _ = module.loss(logp, mask, batch, module.options)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_log_z_calibration_reads_what_the_loss_trains(char_tok):
    """The calibration's log Z_φ of each prompt (a prompt-only forward) is the value the
    FlowRL loss sees for that prompt in a rollout, and its statistics are those of numpy."""
    import numpy as np

    policy = tiny_llama(len(char_tok), seed=3)
    # dropout: eval mode must switch it off
    head = LogZHead(policy.config.hidden_size, num_layers=2, dropout=0.5)
    task = type("T", (), {"rewards": lambda self, rows, texts: [float("a" in t) for t in texts]})()
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1", "p2"], "prompt": ["ab", "c", "fed"]})
    exact = torch.tensor([0.3, 1.1, 0.2], dtype=torch.float64)
    module = _online_module(
        policy.train(),
        tiny_llama(len(char_tok), seed=4),
        char_tok,
        task,
        prompts,
        "flowrl",
        group_size=2,
        minibatch_size=6,
        log_z_head=head,
        log_z_exact=exact,
    )
    cal = module.log_z_calibration()
    assert policy.training and head.training  # modes restored
    roll = module.rollout([0, 1, 2])
    head.eval()
    with torch.no_grad():
        _, _, batch = module.loss_inputs(roll, torch.arange(6))
    phi = batch["log_z"][::2].double().numpy()  # one value per prompt (groups of 2)
    err = phi - exact.numpy()
    assert cal["log_z_phi_mean"] == pytest.approx(phi.mean(), abs=1e-6)
    assert cal["log_z_phi_error"] == pytest.approx(err.mean(), abs=1e-6)
    assert cal["log_z_phi_abs_error"] == pytest.approx(np.abs(err).mean(), abs=1e-6)
    assert cal["log_z_phi_corr"] == pytest.approx(np.corrcoef(phi, exact.numpy())[0, 1], abs=1e-5)


def test_a_group_with_a_missing_reward_is_dropped_whole(char_tok):
    """A grader timeout (NaN) in one completion of prompt p1: p1's whole group leaves the
    rollout and is counted; p0's group trains with its own statistics. Every group missing:
    no update."""
    from disa.losses import group_normalize

    policy = tiny_llama(len(char_tok))
    missing = {"p1"}
    texts_seen: list[str] = []

    def rewards(rows, texts):
        texts_seen[:] = texts
        out = [float(len(t) % 2) for t in texts]
        first_of = {pid: i for i, pid in reversed(list(enumerate(rows.prompt_id)))}
        for pid in missing & set(first_of):
            out[first_of[pid]] = float("nan")  # one member of the group: a timeout
        return out

    task = type("T", (), {"rewards": lambda self, rows, texts: rewards(rows, texts)})()
    prompts = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["ab", "c"]})
    module = _online_module(policy, None, char_tok, task, prompts, "grpo")
    roll = module.rollout([0, 1])
    assert module.groups_dropped == 1 and module.rollouts_done == 1
    assert roll["input_ids"].shape[0] == 4 and roll["group_ids"].tolist() == [0, 0, 0, 0]
    kept = torch.tensor([float(len(t) % 2) for t in texts_seen[:4]])  # p0's group, in order
    assert torch.equal(roll["reward"], kept)
    assert torch.allclose(
        roll["advantages"], group_normalize(kept, torch.zeros(4, dtype=torch.long), "group")
    )
    missing.add("p0")
    assert (
        module.rollout([0, 1]) is None and module.groups_dropped == 3 and module.rollouts_done == 2
    )


def test_whole_group_minibatches(char_tok):
    module = OnlinePolicyModule.__new__(OnlinePolicyModule)
    module.group_size, module.minibatch = 4, 8
    idx = module.minibatch_index(16, torch.Generator().manual_seed(0))
    groups = (idx // 4).tolist()
    assert len(idx) == 8 and all(groups.count(g) == 4 for g in set(groups))


@pytest.mark.parametrize("algorithm", ["disa", "flowrl", "grpo", "gspo", "lora_sft"])
def test_every_algorithm_trains_on_the_embedded_task(tmp_path, algorithm):
    from test_pipeline import run_py

    run_py(tmp_path, "run", f"algorithm={algorithm}", "logger=csv")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["algorithm"] == algorithm and s["train.steps"] == 5
    online = algorithm in ("flowrl", "grpo", "gspo")
    assert (s["train.tokens_generated"] > 0) == online
    assert ("anchor.mean_abs_error" in s) == (not online)  # online runs skip the proposal stages
    assert 0 <= s["policy.mean_at_k"] <= 1
    metrics = pd.read_csv(next((tmp_path / "run" / "csv").rglob("metrics.csv")))
    assert metrics["train/loss"].notna().any()
    # the default schedule (constant, no warmup) leaves the configured learning rate as it is
    # (logged through a float32 tensor: 7 digits)
    lr = {"lora_sft": 3e-3}.get(algorithm, 1e-3)
    assert (
        metrics["train/lr"].dropna().tolist()
        == [pytest.approx(lr, rel=1e-7)] * metrics["train/lr"].notna().sum()
    )
    # FlowRL's learned log Z_φ is logged against the exact log Z of the training prompts
    calibration = {"train/log_z_phi_error", "train/log_z_phi_abs_error", "train/log_z_phi_mean"}
    assert calibration <= set(metrics) if algorithm == "flowrl" else not calibration & set(metrics)
    if algorithm == "flowrl":
        logged = metrics.dropna(subset=["train/log_z_phi_error"])
        assert (
            len(logged) >= 2
            and (logged["train/log_z_phi_abs_error"] >= logged["train/log_z_phi_error"].abs()).all()
        )


# -- learning-rate schedule ------------------------------------------------------------------------
def _lr_by_hand(decay: str, warmup: int, total: int, step: int) -> float:
    """The multiplier of the learning rate used by optimizer step ``step`` (0-based)."""
    import math

    if step < warmup:
        return step / warmup
    if decay == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return (
        max(0.0, 1 - progress)
        if decay == "linear"
        else max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    )


@pytest.mark.parametrize(
    ("decay", "warmup"),
    [("constant", 0), ("constant", 3), ("linear", 0), ("linear", 4), ("cosine", 0), ("cosine", 2)],
)
def test_lr_schedule_shapes_by_hand(decay, warmup):
    from disa.training.schedule import lr_scheduler

    total, base = 10, 0.3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = lr_scheduler(opt, decay, warmup, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == [
        pytest.approx(base * _lr_by_hand(decay, warmup, total, k), abs=1e-15) for k in range(total)
    ]
    if decay == "constant" and warmup == 0:
        assert used == [base] * total  # exactly: the behaviour of a run without a schedule


def test_the_validator_accepts_exactly_the_schedulers_decays(make_cfg):
    """disa.config may not import the training unit (tests/test_architecture.py), so it lists
    the decays itself; that list must stay the scheduler's."""
    from disa.config import ConfigError, validate
    from disa.training.schedule import DECAYS

    for decay in DECAYS:
        validate(make_cfg(f"lr_schedule.decay={decay}", "lr_schedule.warmup_steps=1"))
    with pytest.raises(
        ConfigError, match=r"lr_schedule.decay.*allowed: one of \['constant', 'linear', 'cosine'\]"
    ):
        validate(make_cfg("lr_schedule.decay=step"))
    with pytest.raises(ConfigError, match=r"lr_schedule.warmup_steps=.*below trainer.max_steps"):
        validate(make_cfg("lr_schedule.warmup_steps=100000"))


def test_lr_schedule_refuses_unknown_decay_and_long_warmup():
    from disa.training.schedule import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"lr_schedule.decay='step' is not known; allowed: \['constant', 'linear', 'cosine'\]",
    ):
        lr_scheduler(opt, "step", 0, 10)
    with pytest.raises(
        ValueError, match=r"warmup_steps=10; allowed: an integer in \[0, trainer.max_steps=10\)"
    ):
        lr_scheduler(opt, "linear", 10, 10)


@pytest.mark.parametrize("algorithm", ["disa", "grpo"])
def test_lr_schedule_steps_once_per_optimizer_step_and_is_logged(tmp_path, algorithm):
    """Offline (Lightning steps the scheduler) and online (manual optimization: the module
    does) alike, the learning rate of optimizer step k is the schedule's k-th value."""
    from test_pipeline import run_py

    run_py(
        tmp_path,
        "run",
        f"algorithm={algorithm}",
        "logger=csv",
        "lr_schedule.decay=linear",
        "lr_schedule.warmup_steps=2",
    )
    metrics = pd.read_csv(next((tmp_path / "run" / "csv").rglob("metrics.csv"))).dropna(
        subset=["train/lr"]
    )
    expected = [1e-3 * _lr_by_hand("linear", 2, 5, k) for k in range(5)]
    if algorithm == "grpo":  # one logged row per rollout of 2 updates: their mean
        expected = [sum(expected[i : i + 2]) / len(expected[i : i + 2]) for i in range(0, 5, 2)]
    # float32 logs
    assert metrics["train/lr"].tolist() == [pytest.approx(x, rel=1e-7, abs=1e-12) for x in expected]


def test_online_algorithm_trains_the_lora_adapters(tmp_path):
    """``algorithm.lora`` applies to the online algorithms too: the saved (merged) policy
    differs from π_ref by a low-rank update in the adapted layers only."""
    from test_pipeline import run_py

    from disa.models import load_model

    run_py(
        tmp_path,
        "run",
        "algorithm=grpo",
        "logger=none",
        "+algorithm.lora={r:2,alpha:4,dropout:0.0,target_modules:[q_proj]}",
    )
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["train.steps"] == 5 and s["train.tokens_generated"] > 0
    ref_dir = next((tmp_path / "cache" / "backbone").glob("*/ref"))
    policy_dir = next((tmp_path / "cache" / "train").glob("*/policy"))
    ref, policy = load_model(str(ref_dir)).state_dict(), load_model(str(policy_dir)).state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], policy[k])}
    assert changed and all("q_proj" in k for k in changed), changed
    for k in changed:  # W + (α/r)·BA: an update of rank at most r = 2
        assert torch.linalg.matrix_rank((policy[k] - ref[k]).double(), atol=1e-6) <= 2
